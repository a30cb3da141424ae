"""`load_model`: one door for every model source.

Spellings, parsed here and nowhere else:

- ``default`` — the CIFAR-10 ResNet-20 embedded in the package (no network needed);
- ``local-dir:PATH`` or an existing folder — library detected from ``config.json``;
- ``hf-hub:ORG/NAME[@REV]`` — a timm repository on the Hub;
- ``ORG/NAME[@REV]`` — any Hub repository (timm, transformers or a hub-dfq quantized checkpoint,
  detected from ``config.json``);
- ``NAME[.TAG]`` — a name in timm's registry, e.g. ``resnet18.a1_in1k`` or ``resnet20_cifar``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from importlib import resources
from pathlib import Path

import timm
import torch
import yaml
from timm.models import get_arch_pretrained_cfgs

from ..errors import ModelNotFoundError, ModelSpecError, UnsupportedModelError
from ..registry import resolve
from ..runtime import place_model, resolve_device
from .adapters import ModelAdapter, detection_order
from .checks import check_model_numbers, check_stored_dtypes
from .download import commit_of, download_model_repo
from .timm_adapter import load_timm_name
from .vision_model import ModelSource, VisionModel

logger = logging.getLogger(__name__)

__all__ = ["load_model", "load_model_folder", "build_architecture", "resolve_folder", "default_model_dir",
           "detect_library"]

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
_SPELLINGS = (
    "'default', 'local-dir:PATH', an existing folder, 'hf-hub:ORG/NAME', 'ORG/NAME[@REVISION]' "
    "or a timm model name such as 'resnet18.a1_in1k'"
)


def default_model_dir() -> Path:
    """Folder of the embedded default model (a timm-style repo: config, weights, card)."""
    return Path(str(resources.files("hub_dfq") / "assets" / "default"))


def _adapter_for(config: dict, *, architecture_only: bool = False) -> ModelAdapter:
    for adapter in detection_order():
        if (adapter.builds_architecture or not architecture_only) and adapter.detect(config):
            return adapter
    raise UnsupportedModelError(
        "config.json has neither 'architecture' (timm) nor 'model_type' (transformers): "
        "hub-dfq loads timm and transformers image classifiers"
    )


def detect_library(config: dict) -> str:
    """The library that builds the architecture of ``config``: ``"timm"`` or ``"transformers"``."""
    return _adapter_for(config, architecture_only=True).name


def _card_license(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import (
        ModelCard,  # why: huggingface_hub's card parser is only needed here
    )

    try:
        return ModelCard.load(card).data.get("license")
    except (ValueError, yaml.YAMLError, OSError) as err:  # a malformed card must not stop a model from loading
        logger.warning("could not read the licence from %s (%s); recording it as unknown", card, err)
        return None


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: point at a folder saved by timm or transformers")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # nested 100,000 deep: RecursionError
        raise UnsupportedModelError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{config_file} does not hold a JSON object")
    _check_sizes(config, config_file)
    _check_kinds(config, config_file)
    _check_preprocessing(config, config_file)
    return config


# What a config may ask for: beyond these a typo (100000 px, 1e12 classes) would allocate hundreds of GB before
# anything else failed. The largest real classifiers: ~22k classes (ImageNet-22k), inputs of 1024 px or so.
MAX_CLASSES = 1_000_000
MAX_SIDE = 4096
MAX_CHANNELS = 16


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(config: dict, config_file: Path) -> None:
    """Refuse sizes no model has (a class count of "ten", an input of 0 or 100000 pixels), with one line saying which.

    Raises:
        UnsupportedModelError: naming the key, its value and the accepted range.
    """
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}

    def bad(key: str, value: object, expected: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{config_file}: {key} is {value!r}, but it must be {expected}: the config is "
                                     "damaged or hand-edited; fix it or download the model again")

    for key, value in (("num_classes", config.get("num_classes")), ("num_labels", config.get("num_labels")),
                       ("pretrained_cfg.num_classes", pretrained.get("num_classes"))):
        if value is not None and not (_whole(value) and 0 <= value <= MAX_CLASSES):
            raise bad(key, value, f"a whole number of classes, 0 to {MAX_CLASSES:,}")
    for key, value in (("image_size", config.get("image_size")), ("pretrained_cfg.input_size", pretrained.get(
            "input_size")), ("pretrained_cfg.test_input_size", pretrained.get("test_input_size"))):
        if value is None:
            continue
        sides = value[-2:] if key.endswith("input_size") and isinstance(value, list) else value
        sides = sides if isinstance(sides, list) else [sides]
        if not sides or not all(_whole(v) and 1 <= v <= MAX_SIDE for v in sides) or (
                key.endswith("input_size") and (not isinstance(value, list) or len(value) != 3)):
            raise bad(key, value, f"{'[channels, height, width] with ' if key.endswith('input_size') else ''}"
                      f"sides of 1 to {MAX_SIDE} pixels")
        if key.endswith("input_size") and not (_whole(value[0]) and 1 <= value[0] <= MAX_CHANNELS):
            raise bad(key, value, f"[channels, height, width] with 1 to {MAX_CHANNELS} channels")
    channels = config.get("num_channels")
    if channels is not None and not (_whole(channels) and 1 <= channels <= MAX_CHANNELS):
        raise bad("num_channels", channels, f"a whole number of channels, 1 to {MAX_CHANNELS}")
    labels = config.get("id2label")
    if labels is not None and (not isinstance(labels, dict) or len(labels) > MAX_CLASSES):
        raise bad("id2label", type(labels).__name__ if not isinstance(labels, dict) else f"{len(labels)} entries",
                  f"a mapping of at most {MAX_CLASSES:,} class names")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _damaged(config_file: Path, key: str, value: object, expected: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{config_file}: {key} is {value!r}, but it must be {expected}: the config is "
                                 "damaged or hand-edited; fix it or download the model again")


def _check_kinds(config: dict, config_file: Path) -> None:
    """Refuse sections of the wrong JSON type (an architecture of 42, a pretrained_cfg list), which failed deep in
    timm or hub-dfq with an AttributeError."""
    for key, kind, name in (("architecture", str, "a model name"), ("model_type", str, "a model type name"),
                            ("pretrained_cfg", dict, "a JSON object"), ("quantization_config", dict,
                                                                       "a JSON object")):
        value = config.get(key)
        if value is not None and not isinstance(value, kind):
            raise _damaged(config_file, key, value, name)
    labels = config.get("id2label")
    if isinstance(labels, dict) and not all(str(k).lstrip("-").isdigit() for k in labels):
        raise _damaged(config_file, "id2label", labels, "a mapping from class indices ('0', '1', ...) to names")


# Crop modes timm knows, and the resampling filters torchvision's resize takes.
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _check_preprocessing(config: dict, config_file: Path) -> None:
    """Refuse preprocessing no model was trained with: a standard deviation of 0, negative or NaN divides every
    pixel into Inf or NaN, and the accuracy computed from it was printed as if it meant something.

    Raises:
        UnsupportedModelError: naming the key, its value and what it must be.
    """
    cfg = config.get("pretrained_cfg") or {}
    size = cfg.get("input_size")
    channels = size[0] if isinstance(size, list) and size else 3
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if len(values) != channels or not all(_number(v) for v in values) or (
                key == "std" and not all(v > 0 for v in values)):
            raise _damaged(config_file, f"pretrained_cfg.{key}", value,
                           f"{channels} finite numbers" + (" above 0" if key == "std" else ""))
    crop_pct = cfg.get("crop_pct")
    if crop_pct is not None and not (_number(crop_pct) and 0 < crop_pct <= 10):
        raise _damaged(config_file, "pretrained_cfg.crop_pct", crop_pct, "a fraction above 0 (1.0: no crop margin)")
    if cfg.get("interpolation") and cfg["interpolation"] not in INTERPOLATIONS:
        raise _damaged(config_file, "pretrained_cfg.interpolation", cfg["interpolation"],
                       f"one of {', '.join(INTERPOLATIONS)}")
    if cfg.get("crop_mode") is not None and cfg["crop_mode"] not in CROP_MODES:
        raise _damaged(config_file, "pretrained_cfg.crop_mode", cfg["crop_mode"], f"one of {', '.join(CROP_MODES)}")
    names, classes = cfg.get("label_names"), cfg.get("num_classes", config.get("num_classes"))
    if names is not None and (not isinstance(names, list) or (_whole(classes) and classes and len(names) != classes)):
        raise _damaged(config_file, "pretrained_cfg.label_names", f"{len(names)} names" if isinstance(names, list)
                       else names, f"a list of {classes} class names (num_classes)")


def _with_library(folder: Path, source: ModelSource, config: dict, library: str) -> ModelSource:
    license_ = _card_license(folder) or (config.get("pretrained_cfg") or {}).get("license")
    return ModelSource(spec=source.spec, library=library,
                       architecture=config.get("architecture") or config.get("model_type", "?"),
                       repo_id=source.repo_id, revision=source.revision, commit=source.commit, path=str(folder),
                       license=license_)


def load_model_folder(folder: Path, source: ModelSource, *, trust_remote_code: bool = False,
                pretrained: bool = True) -> VisionModel:
    """Load a model folder with the adapter its ``config.json`` calls for (see :mod:`.adapters`)."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    config = _read_config(folder)
    adapter = _adapter_for(config, architecture_only=not pretrained)
    library = detect_library(config)
    model = resolve(adapter.load)(folder, _with_library(folder, source, config, library),
                                  trust_remote_code=trust_remote_code, pretrained=pretrained)
    if pretrained:  # loaded numbers, checked once here (random ones are finite by construction)
        check_stored_dtypes(folder, model.module, spec=source.spec)
        check_model_numbers(model.module, spec=source.spec)
    return model


def build_architecture(folder: Path, source: ModelSource, *, trust_remote_code: bool = False) -> VisionModel:
    """The float architecture of a folder with random weights (what a quantized checkpoint is rebuilt on)."""
    return load_model_folder(folder, source, trust_remote_code=trust_remote_code, pretrained=False)


def _split_revision(spec: str, revision: str | None) -> tuple[str, str | None]:
    if "@" in spec:
        spec, _, suffix = spec.rpartition("@")
        if revision and revision != suffix:
            raise ModelSpecError(f"revision given twice: '@{suffix}' in the spec and revision={revision!r}")
        revision = suffix
    return spec, revision


def resolve_folder(spec: str | os.PathLike[str], *, revision: str | None = None,
                   token: str | bool | None = None) -> tuple[Path, ModelSource] | None:
    """The local folder a spec names (downloading a Hub repo), or ``None`` for a timm registry name.

    Raises:
        ModelSpecError: the spec matches no spelling.
        ModelNotFoundError: the folder or repo does not exist.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelSpecError(f"a model spec must be a string or a path, got {type(spec).__name__}: use {_SPELLINGS}")
    text = os.fspath(spec).strip()
    if not text:
        raise ModelSpecError(f"empty model spec: use {_SPELLINGS}")
    local = ModelSource(spec=text, library="", architecture="")
    if text == "default":
        return default_model_dir(), local
    if text.startswith("local-dir:"):
        folder = Path(text[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"model folder {folder} does not exist")
        return folder.resolve(), local
    if text.startswith("hf-hub:"):
        repo_id, revision = _split_revision(text[len("hf-hub:"):], revision)
        folder, source = _download(text, repo_id, revision, token)
        if (folder / "config.json").is_file() and detect_library(_read_config(folder)) != "timm":
            raise ModelSpecError(f"{repo_id} is not a timm model: drop the 'hf-hub:' prefix to load it with "
                                 "transformers")
        return folder, source
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve(), local
    if path.is_file():
        raise ModelSpecError(f"{text} is a file: pass the folder that holds it and its config.json")
    name, revision = _split_revision(text, revision)
    if _REPO_ID.match(name) and not text.startswith((".", "/", "~")):
        return _download(text, name, revision, token)
    if timm.is_model(name.split(".")[0]):
        return None
    if os.sep in text or text.startswith((".", "~")):
        raise ModelNotFoundError(f"model folder {text} does not exist")
    raise ModelSpecError(f"unknown model {text!r}: use {_SPELLINGS}")


def _download(spec: str, repo_id: str, revision: str | None, token: str | bool | None) -> tuple[Path, ModelSource]:
    folder = download_model_repo(repo_id, revision=revision, token=token)
    return folder, ModelSource(spec=spec, library="", architecture="", repo_id=repo_id, revision=revision,
                               commit=commit_of(folder))


def load_model(
    spec: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    pretrained: bool = True,
    device: str | torch.device | None = None,
) -> VisionModel:
    """Load an image classifier from the Hub, a local folder, timm's registry or the embedded default.

    A hub-dfq quantized checkpoint loads too: the model then computes the integer model (its
    ``quantization_config`` says how it was made).

    Args:
        spec: what to load; see the module docstring for every spelling.
        revision: branch, tag or commit of a Hub repo (same as an ``@REVISION`` suffix).
        token: Hub token for private or gated repos; by default the logged-in one.
        trust_remote_code: allow transformers models whose code lives in their repo. Off by default.
        pretrained: ``False`` builds the architecture with random weights instead of loading them.
        device: where the model goes (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); ``None``: the CPU.

    Returns:
        A :class:`VisionModel` in eval mode.

    Raises:
        ModelSpecError: the spec matches no spelling.
        ModelNotFoundError: the folder or repo does not exist, or holds no weights.
        UnsupportedModelError: not an image classifier, or an architecture the library lacks.
        UnsafeCheckpointError: the weights could only be read by unpickling code.

    Example:
        >>> model = load_model("default")
        >>> model.labels[:3]
        ['airplane', 'automobile', 'bird']
    """
    if device is not None:
        resolve_device(device)  # a device that does not exist fails before the download
    resolved = resolve_folder(spec, revision=revision, token=token)
    if resolved is not None:
        folder, source = resolved
        model = load_model_folder(folder, source, trust_remote_code=trust_remote_code, pretrained=pretrained)
    else:
        text = os.fspath(spec).strip()
        name, _ = _split_revision(text, revision)
        model = _load_timm_registry(text, name, token, trust_remote_code=trust_remote_code, pretrained=pretrained)
    return place_model(model, device)


def _load_timm_registry(spec: str, name: str, token, *, trust_remote_code: bool, pretrained: bool) -> VisionModel:
    arch, _, tag = name.partition(".")
    source = ModelSource(spec=spec, library="timm", architecture=arch)
    if not pretrained:
        return load_timm_name(name, source, pretrained=False)
    cfgs = get_arch_pretrained_cfgs(arch)
    if tag and f"{arch}.{tag}" not in cfgs:
        raise ModelSpecError(f"timm has no pretrained tag {tag!r} for {arch}; known: {sorted(cfgs) or 'none'}")
    # timm orders an architecture's tags with the default first.
    cfg = cfgs[f"{arch}.{tag}"] if tag else next(iter(cfgs.values()), None)
    if cfg is not None and cfg.file:
        model = load_timm_name(name, source, pretrained=True)
        check_model_numbers(model.module, spec=spec)
        return model
    if cfg is not None and cfg.hf_hub_id:
        folder, hub_source = _download(spec, cfg.hf_hub_id, None, token)
        return load_model_folder(folder, hub_source, trust_remote_code=trust_remote_code, pretrained=True)
    raise ModelNotFoundError(
        f"timm has no downloadable weights for {name!r}: pass `pretrained=False` for random weights, or load a "
        "Hub repo or a local folder"
    )
