"""The shape of the package: layers that only point down, no import cycles, a cheap import and CLI start-up.

The import graph is read from the source (``ast``), so these tests see every import, also those that
only run on some code paths.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hub_dfq"

# Lower layers never import higher ones (by any import, module-level or inside a function).
CORE = ("hub_dfq.quant.config", "hub_dfq.quant.integer", "hub_dfq.quant.quantizers", "hub_dfq.quant.observers",
        "hub_dfq.quant.fold", "hub_dfq.quant.modules", "hub_dfq.quant.tracing", "hub_dfq.quant.padding",
        "hub_dfq.quant.float_parts", "hub_dfq.quant.prepare",
        "hub_dfq.quant.packing", "hub_dfq.quant.model", "hub_dfq.bnstats")
FORBIDDEN = {
    "hub_dfq.quant": ("hub_dfq.hub", "hub_dfq.backends", "hub_dfq.cli", "hub_dfq.audit", "huggingface_hub"),
    "hub_dfq.synth": ("hub_dfq.quant", "hub_dfq.audit", "hub_dfq.hub", "hub_dfq.backends", "hub_dfq.cli"),
    "hub_dfq.models": ("hub_dfq.quant", "hub_dfq.synth", "hub_dfq.audit", "hub_dfq.hub", "hub_dfq.backends",
                       "hub_dfq.cli"),
    "hub_dfq.audit": ("hub_dfq.quant", "hub_dfq.hub", "hub_dfq.backends", "hub_dfq.cli"),
    "hub_dfq.backends": ("hub_dfq.hub", "hub_dfq.cli", "hub_dfq.synth", "hub_dfq.audit"),
    "hub_dfq.hub": ("hub_dfq.cli", "hub_dfq.audit"),
}
HEAVY = ("torch", "timm", "transformers", "datasets", "torchvision", "onnxruntime", "huggingface_hub", "accelerate")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, bool, ast.AST]]:
    """``(imported module, at module level, node)`` for every import of a file; TYPE_CHECKING blocks left out."""
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool, ast.AST]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top, child) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child, path.name == "__init__.py")
                for alias in child.names:  # `from . import x` imports the sub-module x
                    candidate = f"{target}.{alias.name}"
                    found.append((candidate if (PACKAGE.parent / candidate.replace(".", "/")).exists()
                                  or (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else target,
                                  top, child))
            else:
                visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return found


def _graph(*, module_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "measurements" in path.parts:
            continue
        module = _module_name(path)
        graph[module] = {name for name, top, _ in _imports(path)
                         if name.startswith("hub_dfq") and name != module and (top or not module_level_only)}
    return graph


def test_no_import_cycles():
    graph = _graph(module_level_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_only_point_down(layer):
    graph = _graph(module_level_only=False)
    wrong = sorted(f"{module} imports {name}" for module, names in graph.items()
                   if module == layer or module.startswith(layer + ".")
                   for name in names for bad in FORBIDDEN[layer] if name == bad or name.startswith(bad + "."))
    assert not wrong, wrong


def test_the_quantization_core_never_imports_the_hub_layer_or_the_hub_client():
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path) in CORE:
            names = [name for name, _, _ in _imports(path)]
            assert not [n for n in names if n.startswith(("hub_dfq.hub", "hub_dfq.backends", "huggingface_hub",
                                                          "hub_dfq.synth", "hub_dfq.audit"))], path


def _import_groups(tree: ast.AST):
    """Runs of consecutive import statements inside functions: ``(first line, last line, statements)``."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for body in [node.body] + [getattr(n, "body", []) for n in ast.walk(node) if isinstance(n, (ast.Try, ast.If))]:
            group: list[ast.stmt] = []
            for stmt in body + [None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    group.append(stmt)
                elif group:
                    yield group[0].lineno, group[-1].end_lineno, group
                    group = []


def test_imports_inside_functions_say_why():
    """An import inside a function is there to keep start-up cheap (or to break a load order): it says so."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for first, last, group in _import_groups(ast.parse("\n".join(lines))):
            window = "\n".join(lines[max(0, first - 3): last])
            if "why" not in window:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{first}")
    assert not missing, missing


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def test_import_and_help_load_no_heavy_library():
    out = _fresh("import sys, hub_dfq, hub_dfq.cli\n"
                 "from hub_dfq.cli import build_parser\n"
                 "build_parser().format_help()\n"
                 f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.strip() == "[]"


def test_the_public_api_resolves_lazily_and_audit_stays_the_verb():
    out = _fresh("import hub_dfq, hub_dfq.audit.core, inspect\n"
                 "print(all(getattr(hub_dfq, n) is not None for n in hub_dfq.__all__), inspect.isfunction(hub_dfq.audit),"
                 " callable(hub_dfq.quantize), hub_dfq.QuantizedModel.__module__)")
    assert out.split() == ["True", "True", "True", "hub_dfq.quant.model"]


def test_timm_learns_the_cifar_resnets_when_it_is_imported_after_hub_dfq():
    out = _fresh("import hub_dfq, timm\nprint(timm.is_model('resnet20_cifar'), timm.is_model('resnet56_cifar'))")
    assert out.split() == ["True", "True"]


def test_transformers_loads_a_checkpoint_after_a_plain_import_hub_dfq(tmp_path):
    """transformers learns the hub_dfq quantization method without hub_dfq importing transformers itself."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    import hub_dfq

    folder = tmp_path / "fp"
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    ResNetForImageClassification(config).eval().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    qmodel = hub_dfq.quantize(hub_dfq.load_model(folder), weights=4, activations=8,
                              calibration=torch.randn(8, 3, 32, 32), algorithm="calibrate")
    hub_dfq.save_pretrained(qmodel, tmp_path / "q")
    code = ("import sys, torch, hub_dfq\n"
            "assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForImageClassification\n"
            f"model = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'q')!r})\n"
            "torch.manual_seed(0)\n"
            "x = torch.randn(2, 3, 32, 32)\n"
            "with torch.no_grad():\n"
            "    same = torch.equal(model(pixel_values=x).logits, hub_dfq.from_pretrained("
            f"{str(tmp_path / 'q')!r})(x))\n"
            "print(same)")
    assert _fresh(code).strip().splitlines()[-1] == "True"
