"""Publishing quantized models: the integer checkpoint format, model cards, Hub pushes, reloads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..publish import PushResult, push_folder
from ..quant.api import QuantizedModel
from .card import render_model_card, reproduce_command
from .checkpoint import FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME, is_quantized_checkpoint, load_quantized, save_quantized
from .onnx import ONNX_NAME, OnnxClassifier, compare_onnx, export_onnx, load_onnx

try:  # registers the "hub_dfq" quantization method with transformers
    from . import transformers_plugin  # noqa: F401
except ImportError:  # transformers too old for quantizer registration: hub_dfq.from_pretrained still works
    transformers_plugin = None

__all__ = [
    "FORMAT_VERSION",
    "ONNX_NAME",
    "QUANT_METHOD",
    "OnnxClassifier",
    "compare_onnx",
    "export_onnx",
    "from_pretrained",
    "is_quantized_checkpoint",
    "load_onnx",
    "push_to_hub",
    "render_model_card",
    "reproduce_command",
    "save_pretrained",
]


def _fp32_bytes(qmodel: QuantizedModel) -> int:
    return sum(p.numel() * 4 for p in qmodel.model.module.state_dict().values() if p.is_floating_point())


def save_pretrained(
    qmodel: QuantizedModel,
    folder: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    evaluation: dict[str, Any] | None = None,
    command: str | None = None,
    calibration_repo: str | None = None,
    overwrite: bool = False,
    onnx: bool = False,
) -> Path:
    """Write ``qmodel`` as a Hub model repo folder: integer safetensors, config, model card.

    Args:
        qmodel: the quantized model.
        folder: destination (must be empty or absent unless ``overwrite``).
        repo_id: the Hub repo it is meant for (used in the card's links and snippets).
        evaluation: accuracy of the float and quantized models (see :func:`render_model_card`).
        command: the command line that made it, for the card.
        calibration_repo: Hub dataset repo of the published synthetic calibration set.
        overwrite: replace an existing folder.
        onnx: also write ``model.onnx`` (the integer model for ONNX Runtime, see :func:`export_onnx`).

    Returns:
        The folder.

    Example:
        >>> qmodel = hub_dfq.quantize("default", weights=4, activations=8)  # doctest: +SKIP
        >>> hub_dfq.save_pretrained(qmodel, "resnet20-w4a8")  # doctest: +SKIP
    """
    target = save_quantized(qmodel, folder, overwrite=overwrite, calibration_repo=calibration_repo, onnx=onnx)
    size = {"bytes": (target / WEIGHTS_NAME).stat().st_size, "fp32_bytes": _fp32_bytes(qmodel)}
    card = render_model_card(qmodel, repo_id=repo_id, evaluation=evaluation, command=command,
                             calibration_repo=calibration_repo, size=size, onnx=(target / ONNX_NAME).is_file())
    card.save(target / "README.md")
    return target


def push_to_hub(
    qmodel: QuantizedModel,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    folder: str | os.PathLike[str] | None = None,
    evaluation: dict[str, Any] | None = None,
    command: str | None = None,
    calibration_folder: str | os.PathLike[str] | None = None,
    dataset_repo: str | None = None,
    onnx: bool = False,
) -> PushResult:
    """Publish ``qmodel`` as a Hub model repo in one commit (and its calibration set, if asked).

    The checkpoint is written completely to ``folder`` (a temporary folder if ``None``) before
    anything is uploaded; a failed push leaves that folder complete and nothing partial on the Hub.

    Args:
        qmodel: the quantized model.
        repo_id: target model repo (created if needed).
        private: create the repo (and the dataset repo) as private.
        token: Hub token; by default the logged-in one.
        revision: branch to commit to.
        folder: where to write the checkpoint first.
        evaluation: accuracy for the card and ``model-index``.
        command: the command line that made it, for the card.
        calibration_folder: the synthetic calibration set's dataset folder, pushed to ``dataset_repo``.
        dataset_repo: Hub dataset repo for the calibration set; the two cards link to each other.
        onnx: also publish ``model.onnx`` (when the folder is written here).

    Returns:
        Where the model landed.

    Raises:
        PublishError: no token, no write access or a failed upload.
    """
    if dataset_repo:
        from ..errors import ConfigError
        from ..synth import push_dataset_folder
        from ..synth.card import write_card
        from ..synth.writer import read_manifest

        if calibration_folder is None:
            raise ConfigError("--push-dataset needs synthetic calibration data (--calibration bns|bns+i|inception|"
                              "gaussian); real calibration data is not republished")
        manifest = read_manifest(Path(calibration_folder))
        write_card(Path(calibration_folder), manifest, repo_id=dataset_repo, model_repo=repo_id)
        push_dataset_folder(calibration_folder, dataset_repo, private=private, token=token)
    with tempfile.TemporaryDirectory(prefix="hub-dfq-push-") as tmp:
        target = Path(folder) if folder is not None else Path(tmp) / "model"
        if folder is None or not (target / WEIGHTS_NAME).exists():
            save_pretrained(qmodel, target, repo_id=repo_id, evaluation=evaluation, command=command,
                            calibration_repo=dataset_repo, overwrite=True, onnx=onnx)
        scheme = f"W{qmodel.config.default.weights}A{qmodel.config.default.activations}"
        return push_folder(target, repo_id, repo_type="model", private=private, token=token, revision=revision,
                           commit_message=f"Upload {scheme} quantized model (hub-dfq)")


def from_pretrained(spec: str | os.PathLike[str], *, revision: str | None = None,
                    token: str | bool | None = None) -> QuantizedModel:
    """Load a hub-dfq quantized checkpoint from a folder or the Hub (bit-identical logits).

    Example:
        >>> qmodel = hub_dfq.from_pretrained("me/resnet20-w4a8-dfq")  # doctest: +SKIP
    """
    return load_quantized(spec, revision=revision, token=token)
