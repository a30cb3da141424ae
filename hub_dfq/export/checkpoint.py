"""The published format of a quantized model, and reading it back bit-exactly.

A quantized checkpoint folder is a Hub model repo:

- ``model.safetensors``: per quantized layer its integer weights (``...weight_quantizer.weight_int``:
  ``int8`` at 5-8 bits, packed into ``uint8`` at 4 bits and lower, see :mod:`.packing`), per-channel
  ``scale`` and float ``bias``; per activation quantizer its ``scale`` and ``zero_point``; every
  tensor that stays in floating point. The float copy of a quantized weight is not stored: it is
  ``weight_int * scale``.
- ``config.json``: the base model's config plus ``quantization_config`` (``quant_method: hub_dfq``).
- ``README.md``: the model card; ``preprocessor_config.json`` for transformers models.
- ``model.onnx`` (optional): the same integer model as an ONNX QDQ graph for ONNX Runtime.

Reloading rebuilds the float architecture from the config, folds and prepares it with the same
:class:`~hub_dfq.quant.QuantConfig` (deterministic: same graph, same names) and loads the state.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, ModelSpecError, OutputExistsError
from ..models.download import commit_of, download_model_repo
from ..models.loader import _load_folder
from ..models.vision_model import ModelSource, VisionModel
from ..quant.api import QuantizedModel
from ..quant.calibrate import act_quantizers, quant_layers
from ..quant.config import QuantConfig
from ..quant.prepare import prepare
from .packing import pack, unpack

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "save_quantized", "load_quantized", "quantization_config",
           "is_quantized_checkpoint"]

FORMAT_VERSION = 1
QUANT_METHOD = "hub_dfq"
WEIGHTS_NAME = "model.safetensors"
_INT_SUFFIX = ".weight_quantizer.weight_int"


def _layer_bits(qmodel: QuantizedModel) -> dict[str, dict[str, Any]]:
    layers = {}
    for name, layer in quant_layers(qmodel.module):
        q = layer.input_quantizer
        layers[name] = {"weights": layer.weight_quantizer.bits, "activations": q.bits if q is not None else None}
    return layers


def calibration_source(calibration: dict[str, Any]) -> str:
    """One line naming the calibration data: ``synthetic: bns (...)`` or ``real: <dataset>``."""
    kind = calibration.get("kind")
    if kind == "synthetic":
        where = calibration.get("repo_id")
        return f"synthetic: {calibration.get('method')}" + (f" ({where})" if where else "")
    if kind == "dataset":
        return f"real: {calibration.get('spec')}" + (f" [{calibration['split']}]" if calibration.get("split") else "")
    return f"{kind or 'unknown'}"


def quantization_config(qmodel: QuantizedModel, *, calibration_repo: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` entry written into ``config.json``.

    Local cache paths are left out (they mean nothing to others); a published calibration set is
    named by its Hub repo.
    """
    from .. import __version__

    cfg = qmodel.config
    source = qmodel.source
    calibration = {k: v for k, v in qmodel.calibration.items() if k != "folder"}
    if calibration_repo:
        calibration["repo_id"] = calibration_repo
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "hub_dfq_version": __version__,
        "weights": cfg.default.weights,
        "activations": cfg.default.activations,
        "first_last_bits": cfg.first_last_bits,
        "residual_bits": cfg.residual_bits,
        "weight_observer": cfg.default.weight_observer,
        "act_observer": cfg.default.act_observer,
        "method": qmodel.method,
        "method_config": qmodel.method_config,
        "calibration": calibration,
        "calibration_source": calibration_source(calibration),
        "base_model": source.repo_id or source.spec,
        "base_model_revision": source.commit or source.revision,
        "input_size": list(qmodel.model.input_size),
        "config": cfg.to_dict(),
        "layers": _layer_bits(qmodel),
        "unquantized": sorted(set(qmodel.report.unsupported) | set(qmodel.report.excluded)),
    }


def _tensors(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    state = qmodel.module.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quant_layers(qmodel.module):
        wq = layer.weight_quantizer
        if not wq.frozen:
            wq.freeze(layer.weight)
        state.pop(f"{name}.weight", None)  # rebuilt as weight_int * scale
        state[f"{name}{_INT_SUFFIX}"] = pack(wq.weight_int, wq.bits)
    for key, value in state.items():
        tensors[key] = value.detach().cpu().contiguous()
    return tensors


def save_quantized(qmodel: QuantizedModel, folder: str | Path, *, overwrite: bool = False,
                   card: str | None = None, calibration_repo: str | None = None, onnx: bool = False) -> Path:
    """Write ``qmodel`` as a Hub model repo folder (see the module docstring).

    The folder is written next to its target and moved into place at the end, so an interrupted
    save never leaves half a checkpoint.

    Args:
        qmodel: the quantized model.
        folder: destination.
        overwrite: replace an existing checkpoint in ``folder``.
        card: README.md text (see :func:`hub_dfq.export.card.render_model_card`); none is written if ``None``.
        calibration_repo: Hub dataset repo of the published calibration set, recorded in the config.
        onnx: also write ``model.onnx``, the integer graph for ONNX Runtime (see :mod:`.onnx`).

    Raises:
        OutputExistsError: ``folder`` holds files and ``overwrite`` is false.
    """
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(f"{target} is not empty: choose another --out folder or pass overwrite=True (--overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        metadata = {"format": "pt", "quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION)}
        save_file(_tensors(qmodel), str(staging / WEIGHTS_NAME), metadata=metadata)
        config = dict(qmodel.model.config)
        config["quantization_config"] = quantization_config(qmodel, calibration_repo=calibration_repo)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        source_dir = Path(qmodel.source.path) if qmodel.source.path else None
        if source_dir is not None and (source_dir / "preprocessor_config.json").is_file():
            shutil.copyfile(source_dir / "preprocessor_config.json", staging / "preprocessor_config.json")
        if card is not None:
            (staging / "README.md").write_text(card)
        if onnx:
            from .onnx import ONNX_NAME, export_onnx

            export_onnx(qmodel, staging / ONNX_NAME)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_quantized_checkpoint(config: dict[str, Any]) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def _resolve(spec: str | Path, revision: str | None, token: str | bool | None) -> tuple[Path, ModelSource]:
    text = str(spec)
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve(), ModelSource(spec=str(spec), library="", architecture="", path=str(path.resolve()))
    if "/" not in text or text.startswith((".", "/", "~")):
        raise ModelSpecError(f"{spec} is neither a folder nor a Hub repo id of a quantized checkpoint")
    repo_id, _, suffix = text.partition("@")
    folder = download_model_repo(repo_id, revision=revision or suffix or None, token=token)
    return folder, ModelSource(spec=str(spec), library="", architecture="", repo_id=repo_id,
                               revision=revision or suffix or None, commit=commit_of(folder))


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder} has no config.json: not a hub-dfq checkpoint") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder}/config.json is not valid JSON: {err}") from err
    qc = config.get("quantization_config")
    if not is_quantized_checkpoint(config):
        raise CheckpointError(f"{folder} is not a hub-dfq quantized checkpoint (no quantization_config with "
                              f"quant_method '{QUANT_METHOD}'): load float models with hub_dfq.load_model")
    version = int(qc.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} uses hub-dfq checkpoint format {version}, newer than this hub-dfq understands "
            f"({FORMAT_VERSION}, written by hub-dfq {qc.get('hub_dfq_version', '?')}): upgrade with "
            "`pip install -U hub-dfq`"
        )
    return config


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete, download it again")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file} is corrupted or truncated ({err}): download or save it again") from err


def build_quantized_module(float_module: torch.nn.Module, qc: dict[str, Any], tensors: dict[str, torch.Tensor],
                           example_input: torch.Tensor):
    """Prepare ``float_module`` with the checkpoint's config and load its integer state (frozen)."""
    config = QuantConfig.from_dict(qc["config"])
    prepared = prepare(float_module, config, example_input=example_input)
    gm = prepared.module
    tensors = dict(tensors)
    try:
        with torch.no_grad():
            for name, layer in quant_layers(gm):
                wq = layer.weight_quantizer
                packed = tensors.pop(f"{name}{_INT_SUFFIX}")
                wq.weight_int = unpack(packed, wq.bits, layer.weight.shape)
                wq.scale.copy_(tensors.pop(f"{name}.weight_quantizer.scale"))
                layer.weight.copy_(wq.weight_int.to(layer.weight.dtype) * wq._view(wq.scale, layer.weight))
        missing, unexpected = gm.load_state_dict(tensors, strict=False)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint does not match its architecture and quantization config: {err}") from err
    handled = {f"{name}{suffix}" for name, _ in quant_layers(gm)
               for suffix in (".weight", _INT_SUFFIX, ".weight_quantizer.scale")}
    missing = [k for k in missing if k not in handled]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint does not match its architecture: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    for _, q in act_quantizers(gm):
        q.mode = "quant"
        q.calibrated = True
    return gm.eval(), prepared.report


def load_quantized(spec: str | Path, *, revision: str | None = None, token: str | bool | None = None) -> QuantizedModel:
    """Load a hub-dfq quantized checkpoint from a folder or the Hub; logits are bit-identical to the saved model.

    Args:
        spec: a folder, ``local-dir:PATH``, or a Hub repo id (``ORG/NAME[@REVISION]``).
        revision: Hub revision.
        token: Hub token for private repos.

    Raises:
        CheckpointError: not a hub-dfq checkpoint, a newer format, or a corrupted/truncated file.
    """
    folder, source = _resolve(spec, revision, token)
    config = _read_config(folder)
    qc = config["quantization_config"]
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    float_model: VisionModel = _load_folder(folder, source, trust_remote_code=False, pretrained=False)
    gm, report = build_quantized_module(float_model.module, qc, tensors, float_model.example_input(1))
    return QuantizedModel(gm, QuantConfig.from_dict(qc["config"]), float_model, dict(qc.get("calibration") or {}),
                          qc.get("method", "calibrate"), dict(qc.get("method_config") or {}), report,
                          {"loaded_from": str(spec)})
