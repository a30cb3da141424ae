"""The published format of a quantized model: save, push and reload it bit-exactly.

A quantized checkpoint folder is a Hub model repo:

- ``model.safetensors``: :meth:`QuantizedModel.checkpoint_tensors` — per quantized layer its integer
  weights (``...weight_quantizer.weight_int``: ``int8`` at 5-8 bits, packed into ``uint8`` at 4 bits
  and lower), per-channel ``scale`` and float ``bias``; per activation quantizer its ``scale`` and
  ``zero_point``; every tensor that stays in floating point.
- ``config.json``: the base model's config plus ``quantization_config`` (``quant_method: hub_dfq``).
- ``README.md``: the model card; ``preprocessor_config.json`` for transformers models.
- optional backend files, e.g. ``model.onnx`` (the same integer model for ONNX Runtime) or
  ``openvino_model.xml``/``.bin`` (for OpenVINO): one per ``backends=`` entry (:mod:`hub_dfq.backends.registry`).

Reloading rebuilds the float architecture from the config, folds and prepares it with the same
:class:`~hub_dfq.quant.config.QuantConfig` (deterministic: same graph, same names) and loads the state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .. import __version__
from ..backends.registry import BACKENDS
from ..deprecation import warn_deprecated
from ..errors import ArgumentTypeError, CheckpointError, ConfigError
from ..locks import hold
from ..models.checks import check_finite
from ..models.loader import build_architecture
from ..models.vision_model import ModelSource, VisionModel
from ..publish import PushResult
from ..quant.config import QuantConfig
from ..quant.model import WEIGHT_INT_SUFFIX, WEIGHT_LOW_SUFFIX, QuantizedModel
from ..quant.modules import act_quantizers, quant_layers
from ..quant.packing import container_bits
from ..quant.placement import strictest
from ..registry import resolve
from ..runtime import place_model
from ..synth.card import write_card
from ..synth.publish import push_dataset_folder
from ..synth.writer import read_manifest
from .adapter import QUANT_METHOD, is_quantized_checkpoint
from .mixin import HubMixin
from .model_card import calibration_source, render_model_card

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "WEIGHTS_NAME", "QuantizedCheckpoint", "save_pretrained", "push_to_hub",
           "from_pretrained", "load_quantized_folder", "quantization_config", "is_quantized_checkpoint",
           "read_tensors", "safetensors_bytes", "write_safetensors"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the config records its quantized-graph version (QuantConfig.graph_version)
WEIGHTS_NAME = "model.safetensors"


def layer_bits(qmodel: QuantizedModel) -> dict[str, dict[str, Any]]:
    layers = {}
    for name, layer in quant_layers(qmodel.module):
        q = layer.input_quantizer
        layers[name] = {"weights": layer.weight_quantizer.bits, "activations": q.bits if q is not None else None}
    return layers


def quantization_config(qmodel: QuantizedModel, *, calibration_repo: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` entry written into ``config.json``.

    Local cache paths are left out (they mean nothing to others); a published calibration set is
    named by its Hub repo.
    """
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
        "weight_grid": cfg.default.weight_grid,
        "act_observer": cfg.default.act_observer,
        "algorithm": qmodel.algorithm,
        "algorithm_config": qmodel.algorithm_config,
        "fingerprint": qmodel.history.get("fingerprint"),
        "calibration": calibration,
        "calibration_source": calibration_source(calibration),
        "base_model": source.repo_id or source.spec,
        "base_model_revision": source.commit or source.revision,
        "input_size": list(qmodel.model.input_size),
        "config": cfg.to_dict(),
        "layers": layer_bits(qmodel),
        "unquantized": qmodel.left_in_float,
        **({"size_budget": {k: allocation[k] for k in ("budget", "bytes", "pinned")}}
           if (allocation := qmodel.history.get("allocation")) else {}),
    }


def _check_quantized(qmodel: Any, verb: str) -> None:
    if not isinstance(qmodel, QuantizedModel):
        raise ArgumentTypeError(f"{verb} takes a QuantizedModel (from hub_dfq.quantize or hub_dfq.from_pretrained), "
                                f"got {type(qmodel).__name__}: quantize the model first, e.g. "
                                "`hub_dfq.quantize(model, weights=4, activations=8)`")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend on the tensors and metadata only.

    The safetensors writer keeps the metadata in a hash map, so its key order in the header changes from one
    process to the next; the header is rewritten with the keys sorted (same length, same tensor offsets).
    """
    data = safetensors_save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > length:  # cannot happen: the same keys and values, reordered
        raise RuntimeError("safetensors header grew while sorting its metadata")
    return data[:8] + text.ljust(length, b" ") + data[8 + length:]


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write :func:`safetensors_bytes` to ``path`` (a file in a staging folder)."""
    path.write_bytes(safetensors_bytes(tensors, metadata))


def _fp32_bytes(qmodel: QuantizedModel) -> int:
    return sum(p.numel() * 4 for p in qmodel.model.module.state_dict().values() if p.is_floating_point())


class QuantizedCheckpoint(HubMixin):
    """A :class:`QuantizedModel` as a Hub model repo, with what its card says about it.

    Args:
        qmodel: the quantized model.
        repo_id: the Hub repo it is meant for (used in the card's links and snippets).
        evaluation: accuracy of the float and quantized models (see :func:`render_model_card`).
        command: the command line that made it, for the card.
        calibration_repo: Hub dataset repo of the published synthetic calibration set.
        backends: inference backends whose files to add (``"onnx"`` writes ``model.onnx``; see
            :data:`hub_dfq.backends.registry.BACKENDS`).

    Raises:
        ConfigError: an unknown backend name.
        DependencyError: a backend whose packages are not installed (the message names the pip command).
    """

    def __init__(self, qmodel: QuantizedModel, *, repo_id: str | None = None, evaluation: dict[str, Any] | None = None,
                 command: str | None = None, calibration_repo: str | None = None, backends: Sequence[str] = ()):
        _check_quantized(qmodel, "QuantizedCheckpoint")
        backends = tuple(dict.fromkeys([backends] if isinstance(backends, str) else backends))
        for name in backends:
            BACKENDS.get(name).require()  # before minutes of export, and with the pip command
        self.qmodel = qmodel
        self.repo_id = repo_id
        self.evaluation = evaluation
        self.command = command
        self.calibration_repo = calibration_repo
        self.backends = tuple(backends)

    def _commit_message(self) -> str:
        default = self.qmodel.config.default
        return f"Upload W{default.weights}A{default.activations} quantized model (hub-dfq)"

    def _save_pretrained(self, folder: Path) -> None:
        qmodel = self.qmodel
        metadata = {"format": "pt", "quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION)}
        write_safetensors(qmodel.checkpoint_tensors(), folder / WEIGHTS_NAME, metadata)
        config = dict(qmodel.model.config)
        config["quantization_config"] = quantization_config(qmodel, calibration_repo=self.calibration_repo)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        source_dir = Path(qmodel.source.path) if qmodel.source.path else None
        if source_dir is not None and (source_dir / "preprocessor_config.json").is_file():
            shutil.copyfile(source_dir / "preprocessor_config.json", folder / "preprocessor_config.json")
        for name in self.backends:
            backend = BACKENDS.get(name)
            _warn_misplaced(qmodel, backend)
            resolve(backend.export)(qmodel, folder / backend.file_name)
        size = {"bytes": (folder / WEIGHTS_NAME).stat().st_size, "fp32_bytes": _fp32_bytes(qmodel)}
        card = render_model_card(qmodel, repo_id=self.repo_id, evaluation=self.evaluation, command=self.command,
                                 calibration_repo=self.calibration_repo, size=size, backends=self.backends)
        card.save(folder / "README.md")

    @classmethod
    def _from_pretrained(cls, folder: Path, *, source: ModelSource) -> "QuantizedCheckpoint":
        return cls(_load(folder, source, _read_config(folder)))


def _warn_misplaced(qmodel: QuantizedModel, backend: Any) -> None:
    """Say so when ``backend`` needs quantizers the model's graph was not built with: it runs, partly in float."""
    rules = qmodel.config.placement
    if strictest([rules, backend.placement]) != rules:
        logger.warning("the model was quantized for %r placement rules, %s needs %r: some layers will run in float "
                       "there; quantize with placement=hub_dfq.BACKENDS.get(%r).placement (CLI: --backend %s) for "
                       "integer kernels everywhere", rules.name, backend.runtime, backend.placement.name, backend.name,
                       backend.name)


def _backend_names(backends: Sequence[str] | str, onnx: bool | None) -> tuple[str, ...]:
    """``backends`` plus the deprecated ``onnx=True`` spelling of ``backends=["onnx"]``."""
    names = [backends] if isinstance(backends, str) else list(backends)
    if onnx is not None:
        warn_deprecated("onnx", 'backends=["onnx"]', stacklevel=3)
        if onnx and "onnx" not in names:
            names.append("onnx")
    return tuple(names)


def _load(folder: Path, source: ModelSource, config: dict[str, Any]) -> QuantizedModel:
    qc = config["quantization_config"]
    tensors = read_tensors(folder / WEIGHTS_NAME)
    check_finite(tensors, spec=str(folder), what="checkpoint tensors")
    float_model = build_architecture(folder, source)
    try:
        quant_config = QuantConfig.from_dict(qc["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json has an unreadable quantization_config.config ({err}): the file "
                              "is damaged, download or save the checkpoint again") from err
    qmodel = QuantizedModel.from_checkpoint(
        float_model, quant_config, tensors, calibration=dict(qc.get("calibration") or {}),
        algorithm=qc.get("algorithm", qc.get("method", "calibrate")),  # "method" before hub-dfq 0.2
        algorithm_config=dict(qc.get("algorithm_config", qc.get("method_config")) or {}),
        history={"loaded_from": source.spec, "fingerprint": qc.get("fingerprint")})
    _check_consistent(folder, qc, tensors, qmodel)
    return qmodel


def _check_consistent(folder: Path, qc: dict[str, Any], tensors: dict[str, torch.Tensor],
                      qmodel: QuantizedModel) -> None:
    """Refuse a checkpoint whose tensors do not fit its config (a hand-edited or damaged config.json).

    Every quantized layer's stored integers must be the size its bit width packs to and lie in its
    integer range; every scale must be positive; every activation zero point in its range; and the
    per-layer bits the config lists must be the ones the model was rebuilt with.
    """
    damaged = "config.json and model.safetensors do not match (one was edited or damaged): download or save the " \
              "checkpoint again"
    listed = qc.get("layers") if isinstance(qc.get("layers"), dict) else {}
    for name, layer in quant_layers(qmodel.module):
        wq = layer.weight_quantizer
        stored = tensors.get(f"{name}{WEIGHT_INT_SUFFIX}")
        numel = layer.weight.numel()
        width = container_bits(wq.bits)
        if stored is not None and stored.numel() != (numel if width == 8 else -(-numel // (8 // width))):
            raise CheckpointError(f"{folder}: layer {name} stores {stored.numel()} values for {numel} weights, which "
                                  f"is not {wq.bits}-bit packing as the config says: {damaged}")
        if wq.weight_int is not None:
            qmin, qmax = wq.bounds(wq.weight_int)
            # the envelope too: a damaged asymmetric `low` would shift every integer with it
            outside = (wq.weight_int < qmin) | (wq.weight_int > qmax) | (wq.weight_int < wq.qmin) | \
                (wq.weight_int > wq.qmax)
            if outside.any():
                low, high = int(wq.weight_int.min()), int(wq.weight_int.max())
                grid = f"{wq.qmin}..{wq.qmax}" if wq.symmetric else "[low, low + 2^bits - 1] of each channel"
                raise CheckpointError(f"{folder}: layer {name} holds integer weights {low}..{high}, outside the "
                                      f"{wq.bits}-bit range {grid} its config gives: {damaged}")
        if (f"{name}{WEIGHT_LOW_SUFFIX}" in tensors) == wq.symmetric:
            have, grid_has = ("stores", "does not have") if wq.symmetric else ("does not store", "needs")
            raise CheckpointError(f"{folder}: layer {name} {have} the lowest integer of each channel, which its "
                                  f"{wq.bits}-bit {wq.grid} weight grid {grid_has}: {damaged}")
        if (wq.scale.detach() <= 0).any():
            raise CheckpointError(f"{folder}: layer {name} has a weight scale of {float(wq.scale.min())}; scales must "
                                  f"be positive: {damaged}")
        entry = listed.get(name)
        q = layer.input_quantizer
        saved = {"weights": wq.bits, "activations": q.bits if q is not None else None}
        if isinstance(entry, dict) and any(k in entry and entry[k] != v for k, v in saved.items()):
            raise CheckpointError(f"{folder}: quantization_config.layers gives {name} {entry}, but its "
                                  f"quantization_config.config gives {saved}: {damaged}")
    for name, q in act_quantizers(qmodel.module):
        if not q.calibrated and q.mode != "quant":
            continue
        if float(q.scale) <= 0:
            raise CheckpointError(f"{folder}: activation quantizer {name} has scale {float(q.scale)}; scales must be "
                                  f"positive: {damaged}")
        if not q.qmin <= int(q.zero_point) <= q.qmax:
            raise CheckpointError(f"{folder}: activation quantizer {name} has zero point {int(q.zero_point)}, outside "
                                  f"its {q.bits}-bit range {q.qmin}..{q.qmax}: {damaged}")
    default = qmodel.config.default
    for key, value in (("weights", default.weights), ("activations", default.activations)):
        if key in qc and qc[key] != value:
            raise CheckpointError(f"{folder}: quantization_config.{key} says {qc[key]}, but its config (what the "
                                  f"tensors were checked against) says {value}: {damaged}")


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder} has no config.json: not a hub-dfq checkpoint") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder}/config.json is not valid JSON: {err}") from err
    if not isinstance(config, dict) or not is_quantized_checkpoint(config):
        raise CheckpointError(f"{folder} is not a hub-dfq quantized checkpoint (no quantization_config with "
                              f"quant_method '{QUANT_METHOD}'): load float models with hub_dfq.load_model")
    qc = config["quantization_config"]
    try:
        version = int(qc.get("format_version", 0))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json has format_version {qc.get('format_version')!r}, which is not "
                              "a number: the file is damaged, download or save the checkpoint again") from err
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} uses hub-dfq checkpoint format {version}, newer than this hub-dfq understands "
            f"({FORMAT_VERSION}, written by hub-dfq {qc.get('hub_dfq_version', '?')}): upgrade with "
            "`pip install -U hub-dfq`"
        )
    if not isinstance(qc.get("config"), dict):
        raise CheckpointError(f"{folder}/config.json has no quantization_config.config: the file is damaged, "
                              "download or save the checkpoint again")
    return config


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, with a clear error when it is missing or damaged."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete, download it again")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file} is corrupted or truncated ({err}): download or save it again") from err


# ---- the verbs -------------------------------------------------------------------------------------

def save_pretrained(
    qmodel: QuantizedModel,
    out_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    evaluation: dict[str, Any] | None = None,
    command: str | None = None,
    calibration_repo: str | None = None,
    overwrite: bool = False,
    backends: Sequence[str] = (),
    onnx: bool | None = None,
) -> Path:
    """Write ``qmodel`` as a Hub model repo folder: integer safetensors, config, model card.

    The folder is checked before anything is written, written beside its target and swapped into
    place at the end (:mod:`hub_dfq.outputs`): an interrupted save leaves the old folder or the new
    one, complete; an existing folder is replaced only if hub-dfq wrote it, and files hub-dfq did not
    write in it are kept.

    Args:
        qmodel: the quantized model.
        out_dir: destination: new or empty, or (with ``overwrite``) a folder hub-dfq wrote.
        repo_id: the Hub repo it is meant for (used in the card's links and snippets).
        evaluation: accuracy of the float and quantized models (see :func:`render_model_card`).
        command: the command line that made it, for the card.
        calibration_repo: Hub dataset repo of the published synthetic calibration set.
        overwrite: replace a checkpoint hub-dfq saved there earlier.
        backends: integer inference backends whose files to add, e.g. ``["onnx"]`` (``model.onnx`` for ONNX
            Runtime) or ``["onnx", "openvino"]`` (see ``hub-dfq list``).
        onnx: deprecated spelling of ``backends=["onnx"]``.

    Returns:
        The folder.

    Raises:
        ArgumentTypeError: ``qmodel`` is not a :class:`QuantizedModel`.
        OutputExistsError: ``out_dir`` is a file, holds files hub-dfq did not write, or holds a checkpoint and
            ``overwrite`` is false.
        UnsafeOutputError: ``out_dir`` is the current folder, a parent of it, the home folder or a root.
        OutputWriteError: the folder cannot be written (read-only, disk full); nothing was changed.
        OutputLockedError: another hub-dfq process is writing ``out_dir``.
        ConfigError: an unknown backend.
        DependencyError: a backend's packages are not installed.

    Example:
        >>> qmodel = hub_dfq.quantize("default", weights=4, activations=8)  # doctest: +SKIP
        >>> hub_dfq.save_pretrained(qmodel, "resnet20-w4a8", backends=["onnx"])  # doctest: +SKIP
    """
    _check_quantized(qmodel, "save_pretrained")
    checkpoint = QuantizedCheckpoint(qmodel, repo_id=repo_id, evaluation=evaluation, command=command,
                                     calibration_repo=calibration_repo, backends=_backend_names(backends, onnx))
    return checkpoint.save_pretrained(out_dir, overwrite=overwrite)


def push_to_hub(
    qmodel: QuantizedModel,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    evaluation: dict[str, Any] | None = None,
    command: str | None = None,
    calibration_folder: str | os.PathLike[str] | None = None,
    dataset_repo: str | None = None,
    backends: Sequence[str] = (),
    onnx: bool | None = None,
) -> PushResult:
    """Publish ``qmodel`` as a Hub model repo in one commit (and its calibration set, if asked).

    ``qmodel`` itself is written into a fresh temporary folder and that folder is uploaded: what
    lands on the Hub is always the model given here. A failed push commits nothing.

    Args:
        qmodel: the quantized model.
        repo_id: target model repo (created if needed).
        private: create the repo (and the dataset repo) as private.
        token: Hub token; by default the logged-in one.
        revision: branch to commit to.
        evaluation: accuracy for the card and ``model-index``.
        command: the command line that made it, for the card.
        calibration_folder: the synthetic calibration set's dataset folder, pushed to ``dataset_repo``.
        dataset_repo: Hub dataset repo for the calibration set; the two cards link to each other.
        backends: integer inference backends whose files to publish too (``["onnx"]``: ``model.onnx``).
        onnx: deprecated spelling of ``backends=["onnx"]``.

    Returns:
        Where the model landed.

    Raises:
        ArgumentTypeError: ``qmodel`` is not a :class:`QuantizedModel`.
        ConfigError: ``dataset_repo`` without synthetic calibration data.
        PublishError: no token, no write access or a failed upload.
    """
    _check_quantized(qmodel, "push_to_hub")
    names = _backend_names(backends, onnx)
    if dataset_repo:
        if calibration_folder is None:
            raise ConfigError("`dataset_repo` needs synthetic calibration data (calibration='bns', 'bns+i', ...); "
                              "real calibration data is not republished")
        with hold(calibration_folder, what="synthetic-data cache entry"):  # its card is rewritten, then pushed
            manifest = read_manifest(Path(calibration_folder))
            write_card(Path(calibration_folder), manifest, repo_id=dataset_repo, model_repo=repo_id)
            push_dataset_folder(calibration_folder, dataset_repo, private=private, token=token)
    checkpoint = QuantizedCheckpoint(qmodel, repo_id=repo_id, evaluation=evaluation, command=command,
                                     calibration_repo=dataset_repo, backends=names)
    return checkpoint.push_to_hub(repo_id, private=private, token=token, revision=revision)


def from_pretrained(spec: str | os.PathLike[str], *, revision: str | None = None,
                    token: str | bool | None = None, device: str | torch.device | None = None) -> QuantizedModel:
    """Load a hub-dfq quantized checkpoint from a folder or the Hub (bit-identical logits).

    ``device``: where the model goes (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None``: the CPU).

    Raises:
        CheckpointError: not a hub-dfq checkpoint, a newer format, or a corrupted/truncated file.

    Example:
        >>> qmodel = hub_dfq.from_pretrained("me/resnet20-w4a8-dfq")  # doctest: +SKIP
    """
    return place_model(QuantizedCheckpoint.from_pretrained(spec, revision=revision, token=token).qmodel, device)


def load_quantized_folder(folder: Path, source: ModelSource, *, trust_remote_code: bool = False,
                          pretrained: bool = True) -> VisionModel:
    """The ``hub_dfq`` model adapter: a quantized checkpoint folder as a :class:`VisionModel` of its integer model."""
    config = _read_config(folder)
    return _load(folder, source, config).as_vision_model(config["quantization_config"])
