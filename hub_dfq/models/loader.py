"""`load_model`: one door for every model source.

Spellings, parsed here and nowhere else:

- ``default`` — the CIFAR-10 ResNet-20 embedded in the package (no network needed);
- ``local-dir:PATH`` or an existing folder — library detected from ``config.json``;
- ``hf-hub:ORG/NAME[@REV]`` — a timm repository on the Hub;
- ``ORG/NAME[@REV]`` — any Hub repository (timm or transformers, detected from ``config.json``);
- ``NAME[.TAG]`` — a name in timm's registry, e.g. ``resnet18.a1_in1k`` or ``resnet20_cifar``.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Callable

import timm

from ..errors import CheckpointError, ModelNotFoundError, ModelSpecError, UnsupportedModelError
from .download import commit_of, download_model_repo
from .timm_adapter import load_timm_folder, load_timm_name
from .transformers_adapter import load_transformers_folder
from .vision_model import ModelSource, VisionModel

__all__ = ["load_model", "default_model_dir", "detect_library"]

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
_SPELLINGS = (
    "'default', 'local-dir:PATH', an existing folder, 'hf-hub:ORG/NAME', 'ORG/NAME[@REVISION]' "
    "or a timm model name such as 'resnet18.a1_in1k'"
)


def default_model_dir() -> Path:
    """Folder of the embedded default model (a timm-style repo: config, weights, card)."""
    return Path(str(resources.files("hub_dfq") / "assets" / "default"))


def detect_library(config: dict) -> str:
    """``"timm"`` for timm configs (``architecture``), ``"transformers"`` for ``model_type`` ones."""
    if "architecture" in config and "model_type" not in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    raise UnsupportedModelError(
        "config.json has neither 'architecture' (timm) nor 'model_type' (transformers): "
        "hub-dfq loads timm and transformers image classifiers"
    )


def _card_license(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.get("license")
    except Exception:  # a malformed card must not stop a model from loading
        return None


def _load_folder(folder: Path, source: ModelSource, *, trust_remote_code: bool, pretrained: bool) -> VisionModel:
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: point at a folder saved by timm or transformers")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedModelError(f"{config_file} is not valid JSON: {err}") from err
    library = detect_library(config)
    if pretrained and (config.get("quantization_config") or {}).get("quant_method") == "hub_dfq":
        raise CheckpointError(f"{source.spec} is a hub-dfq quantized checkpoint: load it with hub_dfq.from_pretrained "
                              "(or transformers' from_pretrained after `import hub_dfq`)")
    license_ = _card_license(folder) or (config.get("pretrained_cfg") or {}).get("license")
    source = ModelSource(
        spec=source.spec,
        library=library,
        architecture=config.get("architecture") or config.get("model_type", "?"),
        repo_id=source.repo_id,
        revision=source.revision,
        commit=source.commit,
        path=str(folder),
        license=license_,
    )
    loaders: dict[str, Callable[[], VisionModel]] = {
        "timm": lambda: load_timm_folder(folder, source, pretrained=pretrained),
        "transformers": lambda: load_transformers_folder(folder, source, trust_remote_code=trust_remote_code,
                                                         pretrained=pretrained),
    }
    return loaders[library]()


def _split_revision(spec: str, revision: str | None) -> tuple[str, str | None]:
    if "@" in spec:
        spec, _, suffix = spec.rpartition("@")
        if revision and revision != suffix:
            raise ModelSpecError(f"revision given twice: '@{suffix}' in the spec and revision={revision!r}")
        revision = suffix
    return spec, revision


def load_model(
    spec: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    pretrained: bool = True,
) -> VisionModel:
    """Load an image classifier from the Hub, a local folder, timm's registry or the embedded default.

    Args:
        spec: what to load; see the module docstring for every spelling.
        revision: branch, tag or commit of a Hub repo (same as an ``@REVISION`` suffix).
        token: Hub token for private or gated repos; by default the logged-in one.
        trust_remote_code: allow transformers models whose code lives in their repo. Off by default.
        pretrained: with a bare timm name, ``False`` gives random weights instead of an error
            when the name has no downloadable weights.

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
    text = os.fspath(spec).strip()
    if not text:
        raise ModelSpecError(f"empty model spec: use {_SPELLINGS}")
    opts = {"trust_remote_code": trust_remote_code, "pretrained": pretrained}

    if text == "default":
        return _load_folder(default_model_dir(), ModelSource(spec=text, library="timm", architecture=""), **opts)

    if text.startswith("local-dir:"):
        folder = Path(text[len("local-dir:"):]).expanduser()
        if not folder.exists():
            raise ModelNotFoundError(f"model folder {folder} does not exist")
        return _load_folder(folder.resolve(), ModelSource(spec=text, library="", architecture=""), **opts)

    if text.startswith("hf-hub:"):
        repo_id, revision = _split_revision(text[len("hf-hub:"):], revision)
        return _load_hub(text, repo_id, revision, token, expect="timm", **opts)

    path = Path(text).expanduser()
    if path.is_dir():
        return _load_folder(path.resolve(), ModelSource(spec=text, library="", architecture=""), **opts)
    if path.is_file():
        raise ModelSpecError(f"{text} is a file: pass the folder that holds it and its config.json")

    name, revision = _split_revision(text, revision)
    if _REPO_ID.match(name) and not text.startswith((".", "/", "~")):
        return _load_hub(text, name, revision, token, expect=None, **opts)

    if timm.is_model(name.split(".")[0]):
        return _load_timm_registry(text, name, token, **opts)

    if os.sep in text or text.startswith((".", "~")):
        raise ModelNotFoundError(f"model folder {text} does not exist")
    raise ModelSpecError(f"unknown model {text!r}: use {_SPELLINGS}")


def _load_hub(spec: str, repo_id: str, revision: str | None, token, *, expect: str | None,
              trust_remote_code: bool, pretrained: bool) -> VisionModel:
    folder = download_model_repo(repo_id, revision=revision, token=token)
    source = ModelSource(spec=spec, library="", architecture="", repo_id=repo_id, revision=revision,
                         commit=commit_of(folder))
    if expect == "timm" and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if detect_library(config) != "timm":
            raise ModelSpecError(f"{repo_id} is not a timm model: drop the 'hf-hub:' prefix to load it with transformers")
    return _load_folder(folder, source, trust_remote_code=trust_remote_code, pretrained=pretrained)


def _load_timm_registry(spec: str, name: str, token, *, trust_remote_code: bool, pretrained: bool) -> VisionModel:
    arch, _, tag = name.partition(".")
    source = ModelSource(spec=spec, library="timm", architecture=arch)
    if not pretrained:
        return load_timm_name(name, source, pretrained=False)
    from timm.models import get_arch_pretrained_cfgs

    cfgs = get_arch_pretrained_cfgs(arch)
    if tag and f"{arch}.{tag}" not in cfgs:
        raise ModelSpecError(f"timm has no pretrained tag {tag!r} for {arch}; known: {sorted(cfgs) or 'none'}")
    # timm orders an architecture's tags with the default first.
    cfg = cfgs[f"{arch}.{tag}"] if tag else next(iter(cfgs.values()), None)
    if cfg is not None and cfg.file:
        return load_timm_name(name, source, pretrained=True)
    if cfg is not None and cfg.hf_hub_id:
        return _load_hub(spec, cfg.hf_hub_id, None, token, expect="timm", trust_remote_code=trust_remote_code,
                         pretrained=True)
    raise ModelNotFoundError(
        f"timm has no downloadable weights for {name!r}: pass pretrained=False (--random-init) for random "
        "weights, or load a Hub repo / local folder"
    )
