"""The shape of the package: layers that only point down, no import cycles, no private modules of other
libraries, a cheap import and CLI start-up.

The import graph is read from the source (``ast``), so these tests see every import, also those that
only run on some code paths, those only a type checker follows (``if TYPE_CHECKING:``) and the lazy
ones: a registry's ``"hub_dfq.module:attribute"`` targets and ``importlib.import_module`` of a literal.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hub_dfq"

# Lower layers never import higher ones (by any import, module-level or inside a function, for type
# checkers only, or named lazily as a "module:attribute" string).
CORE = ("hub_dfq.quant.config", "hub_dfq.quant.integer", "hub_dfq.quant.quantizers", "hub_dfq.quant.observers",
        "hub_dfq.quant.fold", "hub_dfq.quant.modules", "hub_dfq.quant.tracing", "hub_dfq.quant.padding",
        "hub_dfq.quant.float_parts", "hub_dfq.quant.placement", "hub_dfq.quant.prepare",
        "hub_dfq.quant.packing", "hub_dfq.quant.model", "hub_dfq.bnstats")
# Model and data libraries the core never names: what it must know of a model family (which layers torch.fx
# keeps whole) comes as data from the family's adapter (hub_dfq.models.adapters.TracingHints).
CORE_FORBIDDEN = ("hub_dfq.hub", "hub_dfq.backends", "hub_dfq.synth", "hub_dfq.audit", "huggingface_hub", "timm",
                  "transformers", "datasets")
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

# What hub_dfq.registry.resolve imports on first use; written anywhere in the package, it is an edge.
LAZY_TARGET = re.compile(r"(hub_dfq(?:\.\w+)*):\w+(?:\.\w+)*")
IMPORT_FUNCTIONS = ("importlib.import_module", "import_module", "__import__")
# Functions that import a computed name, and where the names they import are read instead.
DYNAMIC_IMPORTS = {
    ("hub_dfq.registry", "resolve"): "its targets are the 'hub_dfq.module:attribute' strings read as edges",
    ("hub_dfq", "__getattr__"): "its targets, the _API table, are imported again under TYPE_CHECKING (checked below)",
}
# Private modules of other packages that hub_dfq may import, each with its reason. Keep it empty if at all
# possible: a private module changes without notice, and a user's upgrade of that library breaks hub_dfq.
PRIVATE_ALLOWED: dict[str, str] = {}


class Import(NamedTuple):
    """One edge of the import graph."""

    name: str  # the imported module
    top: bool  # runs when the importing module loads (or, under TYPE_CHECKING, when a type checker reads it)
    how: str  # "import", "typing" (an `if TYPE_CHECKING:` block) or "lazy" (imported when first used)
    node: ast.AST


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_ours(candidate: str) -> bool:
    path = PACKAGE.parent / candidate.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").exists()


def _called(node: ast.Call) -> str:
    return ast.unparse(node.func)


def _import_call_target(node: ast.Call, module: str, is_package: bool) -> str | None:
    """The module an ``import_module``/``__import__`` call with a literal name imports (relative names resolved)."""
    if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
        return None
    name = node.args[0].value
    if not name.startswith("."):
        return name
    package = module if is_package else module.rpartition(".")[0]
    dots = len(name) - len(name.lstrip("."))
    return ".".join(package.split(".")[: len(package.split(".")) - dots + 1] + [name.lstrip(".")])


def _imports(path: Path) -> list[Import]:
    """Every import of a file: statements (also under TYPE_CHECKING), literal ``import_module`` calls, lazy targets."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    found: list[Import] = []

    def visit(node: ast.AST, top: bool, how: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, top, "typing")
            elif isinstance(child, ast.Import):
                found.extend(Import(alias.name, top, how, child) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child, is_package)
                for alias in child.names:  # `from . import x` imports the sub-module x
                    candidate = f"{target}.{alias.name}"
                    found.append(Import(candidate if _is_ours(candidate) else target, top, how, child))
            else:
                if isinstance(child, ast.Call) and _called(child) in IMPORT_FUNCTIONS:
                    target = _import_call_target(child, module, is_package)
                    if target:
                        found.append(Import(target, False, "lazy", child))
                elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                    # resolved on first use, after both modules have loaded: like an import inside a function
                    match = LAZY_TARGET.fullmatch(child.value)
                    if match:
                        found.append(Import(match.group(1), False, "lazy", child))
                visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), how)

    visit(tree, True, "import")
    return found


def _sources() -> list[Path]:
    # the evaluate measurement is a script evaluate loads on its own, over the public API
    return [path for path in PACKAGE.rglob("*.py") if "measurements" not in path.parts]


def _edges() -> dict[str, list[Import]]:
    """Every module of the package and what it imports (other libraries too), itself and its packages left out."""
    edges: dict[str, list[Import]] = {}
    for path in _sources():
        module = _module_name(path)
        # Importing a module loads its packages first, so an edge to one of them never decides a load order.
        edges[module] = [imp for imp in _imports(path) if imp.name != module and not module.startswith(imp.name + ".")]
    return edges


def _graph(*, module_level_only: bool) -> dict[str, set[str]]:
    return {module: {imp.name for imp in imports
                     if imp.name.startswith("hub_dfq") and (imp.top or not module_level_only)}
            for module, imports in _edges().items()}


def test_no_import_cycles():
    """No two modules need each other to load, nor to be type-checked.

    A cycle only a type checker follows still ties two modules together (neither can be read, tested or
    moved alone); an ``if TYPE_CHECKING:`` guard is how such cycles hid. Imports inside functions and lazy
    targets are left out: they run after both modules have loaded, which is what they are there for
    (a registry names the modules that register in it).
    """
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
    wrong = sorted({f"{module} imports {imp.name} ({imp.how}, line {imp.node.lineno})"
                    for module, imports in _edges().items() if module == layer or module.startswith(layer + ".")
                    for imp in imports for bad in FORBIDDEN[layer]
                    if imp.name == bad or imp.name.startswith(bad + ".")})
    assert not wrong, wrong


def _function_of(tree: ast.AST, node: ast.AST) -> str | None:
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(n is node for n in ast.walk(fn)):
            return fn.name
    return None


def test_every_import_of_a_computed_name_is_a_known_door():
    """``import_module(name)`` with a computed name hides its edge: only the doors whose names the graph reads."""
    found = set()
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called(node) in IMPORT_FUNCTIONS \
                    and _import_call_target(node, _module_name(path), path.name == "__init__.py") is None:
                found.add((_module_name(path), _function_of(tree, node)))
    assert found <= set(DYNAMIC_IMPORTS), sorted(found - set(DYNAMIC_IMPORTS))


def test_the_lazy_public_api_is_also_imported_for_type_checkers():
    """``hub_dfq.<name>`` imports ``_API[name]`` on first use; the TYPE_CHECKING block spells the same edges out."""
    path = PACKAGE / "__init__.py"
    tree = ast.parse(path.read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_API")
    typed = {(node.module, alias.name) for block in tree.body
             if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
             for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {(module.lstrip("."), name) for name, module in table.items()} == typed


@functools.lru_cache(maxsize=None)
def _is_module(dotted: str) -> bool:
    """Whether a dotted name of an installed package is a module, read from its files (nothing imported)."""
    top, *rest = dotted.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found without importing it
    except (ImportError, ValueError):
        return False
    folders = [Path(f) for f in (spec.submodule_search_locations or [])] if spec else []
    for i, part in enumerate(rest):
        inner = [folder / part for folder in folders if (folder / part).is_dir()]
        if inner:
            folders = inner
            continue
        single = any((folder / (part + suffix)).exists()
                     for folder in folders for suffix in importlib.machinery.all_suffixes())
        return single and i == len(rest) - 1
    return spec is not None


def _private(dotted: str, *, known_module: bool) -> str | None:
    """The first underscore-prefixed module along ``dotted`` (``torch._C``), if any."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[: i + 1])
        if part.startswith("_") and not part.startswith("__") and (known_module or _is_module(prefix)):
            return prefix
    return None


def _private_modules(path: Path) -> set[str]:
    """Private modules of other packages a file imports, or reaches as attributes of a module it imported."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    names: dict[str, str] = {}  # local name -> what it is bound to (`import torch`, `from torch import nn`)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a, `import a.b as c` binds c to a.b
                modules.add(alias.name)
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
            modules.add(node.module)
            names.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
        elif isinstance(node, ast.Call) and _called(node) in IMPORT_FUNCTIONS:
            modules.add(_import_call_target(node, _module_name(path), path.name == "__init__.py") or "")
    found = {_private(m, known_module=True) for m in modules if m and not m.startswith("hub_dfq")}
    for node in ast.walk(tree):  # also `torch._dynamo.config`: a private module reached without an import
        chain: list[str] = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if chain and isinstance(node, ast.Name) and node.id in names and not names[node.id].startswith("hub_dfq"):
            found.add(_private(".".join([names[node.id], *chain]), known_module=False))
    found |= {_private(n, known_module=False) for n in names.values() if not n.startswith("hub_dfq")}
    return found - {None}


def test_no_private_module_of_another_package_is_imported():
    """``timm.models._features_fx``-style imports break on the library's next release: use its public names."""
    used = {f"{path.relative_to(PACKAGE.parent)}: {name}" for path in PACKAGE.rglob("*.py")
            for name in _private_modules(path) if name not in PRIVATE_ALLOWED}
    assert not used, sorted(used)


def test_the_quantization_core_never_imports_the_hub_layer_or_a_model_library():
    """By any import the graph reads (module-level, in a function, for type checkers, lazy targets)."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path) in CORE:
            wrong += [f"{_module_name(path)} imports {imp.name} ({imp.how}, line {imp.node.lineno})"
                      for imp in _imports(path)
                      if any(imp.name == bad or imp.name.startswith(bad + ".") for bad in CORE_FORBIDDEN)]
    assert not wrong, wrong
    assert {f"{name.replace('.', '/')}.py" for name in CORE} <= {str(p.relative_to(PACKAGE.parent))
                                                                 for p in PACKAGE.rglob("*.py")}


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
