"""``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` over two hooks, as huggingface_hub's ``ModelHubMixin``.

A class implements ``_save_pretrained(folder)`` (write everything the repo holds into an empty
folder) and ``_from_pretrained(folder, source)``; the mixin adds the rest, the same way for every
artefact hub-dfq publishes:

- ``save_pretrained`` checks the target before anything is written, writes into a fresh staging folder
  beside it and swaps it into place at the end (:mod:`hub_dfq.outputs`): a folder is never seen
  half-written (or without its card), an existing folder is replaced only if hub-dfq wrote it, and
  files hub-dfq did not write in it are kept;
- ``push_to_hub`` always writes the object it is called on into a fresh temporary folder, then
  uploads that folder as one commit: what lands on the Hub is exactly this object;
- ``from_pretrained`` accepts the same specs as :func:`hub_dfq.load_model` (folders, Hub ids).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ModelSpecError
from ..models.loader import resolve_folder
from ..models.vision_model import ModelSource
from ..outputs import check_folder, reserve_folder, staged
from ..publish import PushResult, push_folder

__all__ = ["HubMixin", "check_out_dir"]

T = TypeVar("T", bound="HubMixin")


def check_out_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False, kind: str = "checkpoint") -> Path:
    """The folder a save will write, checked before any work starts (see :func:`hub_dfq.outputs.check_folder`).

    Raises:
        OutputExistsError: ``out_dir`` is a file, holds files hub-dfq did not write, or holds an earlier
            result and ``overwrite`` is false.
        UnsafeOutputError: the current folder, a parent of it, the home folder or a filesystem root.
        OutputWriteError: ``out_dir`` cannot be written.
    """
    return check_folder(out_dir, kind=kind, overwrite=overwrite).path


class HubMixin:
    """Adds ``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` to a class with the two hooks."""

    repo_type = "model"
    output_kind = "checkpoint"  # what its folders hold, for hub_dfq.outputs

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
        """Write the repo folder ``out_dir``: new or empty, or (with ``overwrite``) one hub-dfq wrote.

        Raises:
            OutputExistsError: ``out_dir`` is a file, holds files hub-dfq did not write, or holds an earlier
                result and ``overwrite`` is false.
            UnsafeOutputError: the current folder, a parent of it, the home folder or a filesystem root.
            OutputWriteError: the folder cannot be written (read-only, disk full); nothing was changed.
            OutputLockedError: another hub-dfq process is writing ``out_dir``.
        """
        with reserve_folder(out_dir, kind=self.output_kind, overwrite=overwrite) as out:
            with staged(out) as staging:
                self._save_pretrained(staging)
            return out.path

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
