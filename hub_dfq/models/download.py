"""Fetch a model repository from the Hub, safely, and say clearly why when that fails."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import ModelNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["download_model_repo", "commit_of"]

METADATA_PATTERNS = ["*.json", "README.md", "*.txt"]
SAFE_WEIGHT_PATTERNS = ["*.safetensors"]
PICKLE_WEIGHT_PATTERNS = ["pytorch_model.bin", "*.pth", "*.pt", "*.pth.tar"]


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], token: str | bool | None) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token))
    except GatedRepoError as err:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its terms on the Hub, then log in (`hf auth login`) or pass a token"
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"no model repository {repo_id!r} on {constants.ENDPOINT} (or it is private: log in or pass a "
            "token). Local folders are spelled 'local-dir:PATH'"
        ) from err
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}: use a branch, tag or commit sha") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise ModelNotFoundError(
            f"{repo_id} is not in the local cache and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}: download it once online, "
            "or point at a local folder with 'local-dir:PATH'"
        ) from err
    except (HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(f"could not download {repo_id} from {constants.ENDPOINT}: {err}") from err


def download_model_repo(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Download config, card and weights of a Hub model repo; return the snapshot folder.

    Safetensors weights are preferred. Pickle checkpoints are only fetched when a repo has no
    safetensors, and the adapters then read them with ``torch.load(weights_only=True)``.
    """
    folder = _snapshot(repo_id, revision, METADATA_PATTERNS + SAFE_WEIGHT_PATTERNS, token)
    if not any(folder.glob("*.safetensors")):
        logger.warning("%s has no safetensors weights; reading its pickle checkpoint with weights_only=True", repo_id)
        try:
            folder = _snapshot(repo_id, folder.name if _looks_like_commit(folder.name) else revision,
                               METADATA_PATTERNS + PICKLE_WEIGHT_PATTERNS, token)
        except ModelNotFoundError:
            pass
    return folder


def _looks_like_commit(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def commit_of(folder: Path) -> str | None:
    """The commit sha of a snapshot folder in the HF cache (its folder name), if it is one."""
    return folder.name if _looks_like_commit(folder.name) and folder.parent.name == "snapshots" else None

