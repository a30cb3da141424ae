"""The model card (README.md) of a quantized checkpoint, from ``model_cards/model_card.md``."""

from __future__ import annotations

from importlib import resources
from typing import Any, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants

from .. import __version__
from ..backends.registry import BACKENDS
from ..deprecation import warn_deprecated
from ..quant.model import QuantizedModel
from ..quant.modules import quant_layers
from ..quant.registry import QUANT_ALGORITHMS
from ..synth.registry import SYNTH_METHODS

__all__ = ["render_model_card", "reproduce_command", "calibration_source"]

def calibration_source(calibration: dict[str, Any]) -> str:
    """One line naming the calibration data: ``synthetic: bns (...)`` or ``real: <dataset>``."""
    kind = calibration.get("kind")
    if kind == "synthetic":
        where = calibration.get("repo_id")
        return f"synthetic: {calibration.get('method')}" + (f" ({where})" if where else "")
    if kind == "dataset":
        return f"real: {calibration.get('spec')}" + (f" [{calibration['split']}]" if calibration.get("split") else "")
    return f"{kind or 'unknown'}"


def _synthetic_origin(method: str) -> str:
    info = SYNTH_METHODS.get(method) if method in SYNTH_METHODS else None
    return f"synthetic images generated from the model itself ({info.summary})" if info else "synthetic images"


def _algorithm_description(name: str) -> str:
    return QUANT_ALGORITHMS.get(name).description if name in QUANT_ALGORITHMS else ""


def reproduce_command(qmodel: QuantizedModel) -> str:
    """The ``hub-dfq quantize`` command line that reproduces ``qmodel``."""
    cfg, cal, source = qmodel.config, qmodel.calibration, qmodel.source
    if source.repo_id:
        base = f"{source.repo_id}@{source.commit}" if source.commit else source.repo_id
    else:
        base = source.spec
    parts = ["hub-dfq quantize", base, f"--weights {cfg.default.weights}", f"--activations {cfg.default.activations}"]
    if cal.get("kind") == "synthetic":
        parts.append(f"--calibration {cal.get('method')}")
    elif cal.get("kind") == "dataset":
        parts.append(f"--calibration {cal.get('spec')}")
    if cal.get("n"):
        parts.append(f"--calibration-images {cal['n']}")
    parts.append(f"--algorithm {qmodel.algorithm}")
    if cal.get("preset"):
        parts.append(f"--preset {cal['preset']}")
    if cal.get("seed") is not None:
        parts.append(f"--seed {cal['seed']}")
    if cfg.first_last_bits is None:
        parts.append("--first-last-bits same")
    allocation = qmodel.history.get("allocation")
    if allocation:
        parts.append(f"--size-budget {allocation['budget']}")
    allocated = set(allocation["bits"]) if allocation else set()
    for pattern, change in cfg.overrides:
        if pattern not in allocated:
            parts.append(f"--override '{pattern}:{','.join(f'{k}={v}' for k, v in change)}'")
    parts += [f"--exclude '{pattern}'" for pattern in cfg.exclude]
    return " ".join(parts)


def _mixed_precision(qmodel: QuantizedModel, layers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The card's per-layer table when layers hold different bit widths (overrides or a size budget)."""
    cfg = qmodel.config
    first_last = {n for n, r in qmodel.report.quantized.items() if r.get("first") or r.get("last")}
    uniform = all(v["weights"] == cfg.default.weights and v["activations"] in (None, cfg.default.activations)
                  for n, v in layers.items() if n not in first_last or cfg.first_last_bits is None)
    if uniform:
        return None
    counts: dict[int, int] = {}
    for v in layers.values():
        counts[v["weights"]] = counts.get(v["weights"], 0) + 1
    allocation = qmodel.history.get("allocation")
    return {"rows": [{"name": n, **v} for n, v in layers.items()],
            "counts": ", ".join(f"{n} layers at {b}-bit" for b, n in sorted(counts.items())),
            "budget": f"{allocation['budget']:,} bytes (used {allocation['bytes']:,})" if allocation else None}


def _eval_results(evaluation: dict[str, Any] | None, qname: str) -> list[EvalResult]:
    if not evaluation:
        return []
    dataset = str(evaluation.get("dataset", "unknown"))
    common = {"task_type": "image-classification", "task_name": "Image Classification", "dataset_type": dataset,
              "dataset_name": dataset, "dataset_split": evaluation.get("split"), "metric_type": "accuracy"}
    results = [EvalResult(**common, metric_name=f"top-1 accuracy ({qname})", metric_value=evaluation["quant_top1"])]
    if evaluation.get("fp_top1") is not None:
        results.append(EvalResult(**common, metric_name="top-1 accuracy (full-precision base model)",
                                  metric_value=evaluation["fp_top1"]))
    return results


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}%"


def render_model_card(
    qmodel: QuantizedModel,
    *,
    repo_id: str | None = None,
    evaluation: dict[str, Any] | None = None,
    command: str | None = None,
    calibration_repo: str | None = None,
    size: dict[str, Any] | None = None,
    backends: Sequence[str] = (),
    onnx: bool | None = None,
) -> ModelCard:
    """Build the card of a quantized model.

    Args:
        qmodel: the quantized model.
        repo_id: where it will live on the Hub (for links and ``from_pretrained`` snippets).
        evaluation: ``{"dataset", "split", "n", "fp_top1", "fp_top5", "quant_top1", "quant_top5"}``;
            becomes the accuracy table and ``model-index``.
        command: the command that made it (default: reconstructed from the config).
        calibration_repo: Hub dataset repo of the synthetic calibration set, when it was published.
        size: ``{"bytes": .., "fp32_bytes": ..}`` of the checkpoint.
        backends: the integer backends whose files the repo also holds (``["onnx"]``: ``model.onnx``); the
            evaluation may then carry ``{name}_top1``/``{name}_top5`` of each (``onnx_top1``).
        onnx: deprecated spelling of ``backends=["onnx"]``.
    """
    if onnx is not None:
        warn_deprecated("onnx", 'backends=["onnx"]')
        backends = [*backends, "onnx"] if onnx and "onnx" not in backends else backends
    engines = [BACKENDS.get(name) for name in dict.fromkeys(backends)]
    cfg, source, cal = qmodel.config, qmodel.source, qmodel.calibration
    w, a = cfg.default.weights, cfg.default.activations
    scheme = f"W{w}A{a}"
    name = repo_id or f"{(source.repo_id or source.architecture or 'model').split('/')[-1]}-{scheme.lower()}-dfq"
    synthetic = cal.get("kind") == "synthetic"
    tags = ["hub-dfq", "quantized", "data-free" if synthetic else "post-training-quantization",
            f"w{w}a{a}", f"{w}-bit", "image-classification", source.library, *(b.name for b in engines)]
    if synthetic:
        tags.append(f"calibration-{cal.get('method')}")
    datasets = [calibration_repo] if calibration_repo else None
    card_data = ModelCardData(
        base_model=source.repo_id or None,
        base_model_relation="quantized" if source.repo_id else None,
        library_name=source.library or None,
        license=source.license or None,
        pipeline_tag="image-classification",
        tags=sorted(set(t for t in tags if t)),
        datasets=datasets,
        model_name=name,
        eval_results=_eval_results(evaluation, scheme) or None,
    )
    base_link = f"[{source.repo_id}]({source.url})" if source.repo_id else f"`{source.spec}`"
    if synthetic:
        where = f"[{calibration_repo}]({_dataset_url(calibration_repo)})" if calibration_repo else \
            "generated on the fly (not published)"
        calibration_link = f"{cal.get('n', '?')} synthetic `{cal.get('method')}` images, {where}"
        origin = _synthetic_origin(str(cal.get("method")))
        data_statement = f"calibrated **without any training data**: only {origin} (`{cal.get('method')}`)."
        data_paragraph = (
            "No real images were used to make this model: neither the base model's training data nor any other "
            f"dataset. Calibration{'' if qmodel.algorithm == 'calibrate' else ' and ' + qmodel.algorithm} used "
            f"{cal.get('n', '?')} synthetic images generated by hub-dfq from the base model alone "
            f"(method `{cal.get('method')}`, seed {cal.get('seed')})."
            + (" Evaluation used real labelled images, only to measure accuracy." if evaluation else "")
        )
    else:
        calibration_link = f"`{calibration_source(cal)}` ({cal.get('n', '?')} images)"
        data_statement = f"calibrated on real images: `{calibration_source(cal)}`."
        data_paragraph = (f"Calibration{'' if qmodel.algorithm == 'calibrate' else ' and ' + qmodel.algorithm} used "
                          f"{cal.get('n', '?')} real images ({calibration_source(cal)}). "
                          "This is not a data-free model.")
    rows = []
    if evaluation:
        ds = f"{evaluation.get('dataset')}" + (f" ({evaluation['split']})" if evaluation.get("split") else "")
        rows = [
            {"model": "full precision (base)", "top1": _pct(evaluation.get("fp_top1")),
             "top5": _pct(evaluation.get("fp_top5")), "n": evaluation.get("n", "?"), "dataset": ds},
            {"model": f"**{scheme} (this model)**", "top1": _pct(evaluation.get("quant_top1")),
             "top5": _pct(evaluation.get("quant_top5")), "n": evaluation.get("n", "?"), "dataset": ds},
        ]
        for backend in engines:
            if evaluation.get(f"{backend.name}_top1") is not None:
                rows.append({"model": f"{scheme}, `{backend.file_name}` in {backend.runtime} (integer kernels)",
                             "top1": _pct(evaluation.get(f"{backend.name}_top1")),
                             "top5": _pct(evaluation.get(f"{backend.name}_top5")), "n": evaluation.get("n", "?"),
                             "dataset": ds})
    size_line = "n/a"
    if size and size.get("bytes"):
        size_line = f"{size['bytes'] / 1e6:.2f} MB" + (
            f" ({size['bytes'] / size['fp32_bytes']:.2f}x of float32)" if size.get("fp32_bytes") else "")
    unquantized = qmodel.left_in_float
    from .checkpoint import layer_bits  # why: checkpoint imports this module

    mixed = _mixed_precision(qmodel, layer_bits(qmodel))
    template = resources.files("hub_dfq") / "model_cards" / "model_card.md"
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(),
        title=name,
        base_link=base_link,
        scheme=scheme,
        hub_dfq_version=__version__,
        data_statement=data_statement,
        accuracy_rows=rows,
        weights=w,
        activations=a,
        weight_observer=cfg.default.weight_observer,
        weight_grid=("asymmetric below 8 bits (each channel's integers span its own range; zero exact)"
                     if any(not layer.weight_quantizer.symmetric for _, layer in quant_layers(qmodel.module))
                     else "symmetric"),
        act_observer=cfg.default.act_observer,
        first_last=f"{cfg.first_last_bits}-bit" if cfg.first_last_bits else "quantized like the rest",
        residual=f"{cfg.residual_bits}-bit operands" if cfg.residual_bits else f"{a}-bit operands",
        method=qmodel.algorithm,
        method_description=_algorithm_description(qmodel.algorithm),
        fingerprint=qmodel.history.get("fingerprint") or "n/a",
        calibration_fingerprint=cal.get("fingerprint"),
        calibration_link=calibration_link,
        unquantized=", ".join(f"`{n}`" for n in unquantized) or "none",
        size_line=size_line,
        repo_ref=repo_id or "PATH/TO/FOLDER",
        library=source.library,
        backend_usages=[b.usage for b in engines],
        command=command or reproduce_command(qmodel),
        data_paragraph=data_paragraph,
        mixed=mixed,
    )


def _dataset_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT}/datasets/{repo_id}"
