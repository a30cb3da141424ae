"""Publishing a finished local folder (model or dataset repo) to the Hub in one commit.

Everything hub-dfq publishes is first written completely to a local folder that already is the repo;
pushing is a separate, all-or-nothing step, so a failed upload never loses or half-writes anything.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from .errors import PublishError
from .outputs import UPLOAD_IGNORE


def _transport_errors() -> tuple[type[Exception], ...]:
    """The request-error base classes of the HTTP clients huggingface_hub may use (httpx, or its httpx2 fork)."""
    found: list[type[Exception]] = []
    # why inside: huggingface_hub 1.x talks through httpx and 2.x through httpx2; only an installed one is imported
    with contextlib.suppress(ImportError):
        import httpx
        found.append(httpx.HTTPError)
    # why inside: as above, for huggingface_hub 2.x's fork
    with contextlib.suppress(ImportError):
        import httpx2
        found.append(httpx2.HTTPError)
    return tuple(found)


logger = logging.getLogger(__name__)

__all__ = ["PushResult", "push_folder"]


@dataclass(frozen=True)
class PushResult:
    """Where a push landed."""

    repo_id: str
    repo_type: str
    url: str
    commit: str | None


def _status(err: HfHubHTTPError) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    keep_local: bool = True,
) -> PushResult:
    """Create ``repo_id`` if needed and upload every file of ``folder`` as one commit.

    hub-dfq's own bookkeeping (the ``.hub-dfq.json`` marker, temporaries of a killed run) is never uploaded.

    Args:
        folder: a complete local repo folder.
        repo_id: ``namespace/name`` on the Hub.
        repo_type: ``"model"`` or ``"dataset"``.
        private: create the repo private (an existing repo keeps its visibility).
        token: Hub token; by default the logged-in one (``hf auth login`` or ``HF_TOKEN``).
        revision: branch to commit to (created from the default branch if missing).
        commit_message: summary of the commit.
        keep_local: ``folder`` stays after a failure, so the error message points to it; ``False`` when it is
            a temporary copy.

    Returns:
        A :class:`PushResult` with the repo URL and the new commit sha.

    Raises:
        PublishError: no token, no write access, or a failed upload. Nothing partial is committed and
            the local folder is untouched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: nothing to push")
    api = HfApi(token=token)
    where = f"{repo_type} repo {repo_id}"
    keep = f"; the local folder {folder} is complete, push it again when fixed" if keep_local else \
        "; push again when fixed"
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message or "Upload with hub-dfq",
            ignore_patterns=UPLOAD_IGNORE,
        )
    except HfHubHTTPError as err:
        status = _status(err)
        if status == 401:
            raise PublishError(
                f"the Hub refused {where} without a valid token: log in with `hf auth login`, set HF_TOKEN "
                f"or pass token={keep}"
            ) from err
        if status == 403:
            raise PublishError(f"this token cannot write to {where}: use a token with write access to its "
                               f"namespace{keep}") from err
        raise PublishError(f"uploading {where} failed ({status or 'no status'}); nothing was committed{keep}") from err
    except (OSError, ValueError, RuntimeError, *_transport_errors()) as err:
        # huggingface_hub wraps failed LFS uploads in RuntimeError; the commit never happened. An unreachable
        # endpoint raises its HTTP client's own error (httpx's ConnectError is not an OSError).
        cause = err.__cause__ or err
        raise PublishError(f"uploading {where} failed ({cause}); nothing was committed{keep}") from err
    prefix = "datasets/" if repo_type == "dataset" else ""
    url = str(getattr(info, "repo_url", "") or f"{api.endpoint}/{prefix}{repo_id}")
    logger.info("pushed %s to %s", folder, url)
    return PushResult(repo_id=repo_id, repo_type=repo_type, url=url, commit=getattr(info, "oid", None))
