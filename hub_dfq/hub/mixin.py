"""``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` over two hooks, as huggingface_hub's ``ModelHubMixin``.

A class implements ``_save_pretrained(folder)`` (write everything the repo holds into an empty
folder) and ``_from_pretrained(folder, source)``; the mixin adds the rest, the same way for every
artefact hub-dfq publishes:

- ``save_pretrained`` writes into a fresh staging folder beside the target and moves it into place
  at the end, so a folder is never seen half-written (or without its card);
- ``push_to_hub`` always writes the object it is called on into a fresh temporary folder, then
  uploads that folder as one commit: what lands on the Hub is exactly this object;
- ``from_pretrained`` accepts the same specs as :func:`hub_dfq.load_model` (folders, Hub ids).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ModelSpecError, OutputExistsError
from ..models.loader import resolve_folder
from ..models.vision_model import ModelSource
from ..publish import PushResult, push_folder

__all__ = ["HubMixin", "check_out_dir"]

T = TypeVar("T", bound="HubMixin")


def check_out_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """The folder a save will write, checked before any work starts.

    Raises:
        OutputExistsError: ``out_dir`` is a file, or holds files and ``overwrite`` is false.
    """
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} is a file: `out_dir` must be a folder (absent or empty)")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(f"{target} is not empty: choose another `out_dir` or pass `overwrite=True`")
    return target


class HubMixin:
    """Adds ``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` to a class with the two hooks."""

    repo_type = "model"

    # ---- hooks -----------------------------------------------------------------------------------
    def _save_pretrained(self, folder: Path) -> None:
        """Write the repo's files into the empty folder ``folder``."""
        raise NotImplementedError

    @classmethod
    def _from_pretrained(cls: type[T], folder: Path, *, source: ModelSource) -> T:
        """Read an object back from a folder ``_save_pretrained`` wrote (or its Hub snapshot)."""
        raise NotImplementedError

    def _commit_message(self) -> str:
        return "Upload with hub-dfq"

    # ---- the verbs ------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the repo folder ``out_dir`` (must be empty or absent unless ``overwrite``).

        Raises:
            OutputExistsError: ``out_dir`` holds files and ``overwrite`` is false.
        """
        target = check_out_dir(out_dir, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            self._save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str | None = None) -> PushResult:
        """Write this object into a fresh folder and upload it to ``repo_id`` as one commit.

        Raises:
            PublishError: no token, no write access or a failed upload (nothing partial is committed).
        """
        with tempfile.TemporaryDirectory(prefix="hub-dfq-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "repo")
            return push_folder(folder, repo_id, repo_type=self.repo_type, private=private, token=token,
                               revision=revision, commit_message=commit_message or self._commit_message(),
                               keep_local=False)

    @classmethod
    def from_pretrained(cls: type[T], spec: str | os.PathLike[str], *, revision: str | None = None,
                        token: str | bool | None = None, **kwargs: Any) -> T:
        """Load from a folder, ``local-dir:PATH`` or a Hub repo id (``ORG/NAME[@REVISION]``)."""
        resolved = resolve_folder(spec, revision=revision, token=token)
        if resolved is None:
            raise ModelSpecError(f"{spec} is a timm model name, not a folder or Hub repo that {cls.__name__} can read")
        folder, source = resolved
        return cls._from_pretrained(folder, source=source, **kwargs)
