"""What :func:`hub_dfq.synthesize` returns: a ``datasets.Dataset`` that knows the Hub dataset folder it was read from.

``synthesize`` writes a complete Hub dataset folder (shards, card, ``preview.png``, ``generation.json``,
see :mod:`hub_dfq.synth.writer`) and reads it back. The result carries the Hub's verbs over that
folder, as the other results of hub-dfq do: :meth:`SyntheticDataset.save_pretrained` copies it,
:meth:`SyntheticDataset.push_to_hub` uploads it in one commit (the upload ``synthesize(push_to_hub=...)``
makes, :func:`hub_dfq.synth.publish.push_dataset_folder`), :meth:`SyntheticDataset.from_pretrained`
reads one back (``hub_dfq.load_images(SPEC)`` reads it as well, as plain images and labels).

Why a subclass of ``datasets.Dataset`` and not a wrapper: callers index it, take ``len``, read
``features``, ``.select`` rows and pass it to :func:`hub_dfq.load_images`, ``quantize(calibration=...)``
and ``audit``, which test ``isinstance(x, datasets.Dataset)``; a wrapper would fail those checks or
have to forward every attribute. The subclass adds no state ``datasets`` must know about (the folder is
an attribute), and in ``datasets`` 5:

- transforms that make new rows (``select``, ``shuffle``, ``sort``, ``map``, ``train_test_split``,
  ``concatenate_datasets``) build a plain ``datasets.Dataset``: they lose the verbs, as they should,
  since the folder no longer describes them;
- transforms that deep-copy ``self`` (``cast_column``, ``remove_columns``, ``rename_column``, ``filter``,
  ``flatten``, ``with_format``, ``with_transform``) keep the class and the folder. Formats and transforms
  only change how rows are read; the others change the features or the row count, and the verbs then
  refuse (:class:`~hub_dfq.errors.ConfigError`) instead of writing a folder that is not that dataset.

``push_to_hub`` overrides ``datasets.Dataset.push_to_hub``, so code written for any ``Dataset`` uploads
hub-dfq's folder (card, preview and ``generation.json`` included) rather than re-encoded shards under a
bare card. It takes that method's keywords where they describe this folder (``split="train"``,
``config_name="default"``, ...) and refuses the others with a pointer to
``datasets.Dataset.push_to_hub(ds, ...)``, which still makes datasets' own layout; it returns the
repository URL, not a ``CommitInfo``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets

from ..errors import ConfigError, DatasetError
from ..outputs import reserve_folder, staged
from ..progress import progress_enabled
from .card import write_card
from .publish import push_dataset_folder
from .writer import CARD, MANIFEST, PREVIEW, file_sha256, read_manifest

__all__ = ["SyntheticDataset", "load_dataset_folder"]

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
# datasets.Dataset.push_to_hub's options, with the values that describe the folder as it is
_SAME_LAYOUT: dict[str, tuple[Any, ...]] = {
    "config_name": ("default",), "split": (None, "train"), "set_default": (None, True), "data_dir": (None,),
    "commit_description": (None,), "create_pr": (None, False), "max_shard_size": (None,), "num_shards": (None,),
    "embed_external_files": (True,), "num_proc": (None,)}


def load_dataset_folder(folder: str | os.PathLike[str], *, progress: bool | None = None) -> datasets.Dataset:
    """The ``train`` split of a dataset folder as a plain ``datasets.Dataset`` (via ``load_dataset(DIR)``)."""
    quiet = not progress_enabled(progress) and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(str(folder), split="train")
    finally:
        if quiet:
            datasets.enable_progress_bars()


class SyntheticDataset(datasets.Dataset):
    """A synthetic dataset as ``datasets.Dataset`` rows (``image``, ``label``) plus the folder they were read from.

    Use it as any ``Dataset``; :meth:`save_pretrained` and :meth:`push_to_hub` publish the folder
    ``synthesize`` wrote, byte for byte (the module docstring says what survives a transform).

    Example:
        >>> ds = hub_dfq.synthesize("default", "bns", num_images=64)  # doctest: +SKIP
        >>> ds.save_pretrained("bns-64")  # doctest: +SKIP
        >>> ds.push_to_hub("me/resnet20-bns-64")  # doctest: +SKIP
    """

    @classmethod
    def _read(cls, folder: str | os.PathLike[str], *, progress: bool | None = None) -> SyntheticDataset:
        """The finished dataset folder ``folder`` (what ``synthesize`` wrote) as a :class:`SyntheticDataset`."""
        plain = load_dataset_folder(folder, progress=progress)
        # same table, info and fingerprint: datasets' caches treat it as the dataset it read
        dataset = cls(plain.data, info=plain.info, split=plain.split, indices_table=plain._indices,
                      fingerprint=plain._fingerprint)
        dataset._hub_dfq_folder = Path(folder).resolve()
        dataset._hub_dfq_rows = (dataset.num_rows, dataset.features.copy())
        return dataset

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike[str], *, revision: str | None = None,
                        token: str | bool | None = None, progress: bool | None = None) -> SyntheticDataset:
        """Read a synthetic dataset hub-dfq wrote: a folder, ``local-dir:PATH`` or a Hub id ``ORG/NAME[@REVISION]``.

        A Hub repo is downloaded whole (card and ``generation.json`` too), so the result can be saved or
        pushed again. For the rows alone, ``hub_dfq.load_images(spec)`` reads any dataset.

        Raises:
            DatasetError: no such folder or repo, or it is not a finished dataset hub-dfq wrote.

        Example:
            >>> ds = hub_dfq.SyntheticDataset.from_pretrained("me/resnet20-bns-64")  # doctest: +SKIP
        """
        folder = _resolve(spec, revision=revision, token=token)
        _finished_manifest(folder)
        return cls._read(folder, progress=progress)

    def __repr__(self) -> str:
        return "Synthetic" + super().__repr__()

    @property
    def folder(self) -> Path:
        """The dataset folder the rows were read from (a cache folder when ``synthesize`` had no ``out_dir``)."""
        folder = getattr(self, "_hub_dfq_folder", None)
        if folder is None:
            raise ConfigError("this SyntheticDataset was not read from a dataset folder: make one with "
                              "hub_dfq.synthesize(...) or SyntheticDataset.from_pretrained(...)")
        return folder

    @property
    def manifest(self) -> dict[str, Any]:
        """The folder's ``generation.json``: arguments, model, provenance, BN divergences."""
        return _finished_manifest(self.folder)

    def _check_unchanged(self) -> None:
        rows, features = getattr(self, "_hub_dfq_rows", (None, None))
        if rows is not None and (self.num_rows != rows or self.features != features):
            raise ConfigError(
                f"this dataset is no longer the one in {self.folder} (a transform changed its rows or columns): "
                "save_pretrained and push_to_hub publish that folder as it is; for the transformed rows use "
                "`ds.save_to_disk(DIR)` or `datasets.Dataset.push_to_hub(ds, REPO)`")

    def save_pretrained(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                        repo_id: str | None = None) -> Path:
        """Copy the dataset folder (shards, ``README.md``, ``preview.png``, ``generation.json``) to ``out_dir``.

        The files are those ``synthesize`` wrote, byte for byte (only hub-dfq's marker ``.hub-dfq.json``
        is its own); other files in the source folder are not part of the dataset and stay behind.

        Args:
            out_dir: new or empty, or (with ``overwrite``) a synthetic dataset hub-dfq wrote.
            overwrite: replace the synthetic dataset in ``out_dir`` (files hub-dfq did not write there are kept).
            repo_id: write the card for this Hub dataset repo (its loading snippet); ``None`` keeps the card.

        Returns:
            The folder.

        Raises:
            ConfigError: the rows were transformed since they were read (see the module docstring).
            DatasetError: the source folder is no longer the finished dataset (a file missing or changed).
            OutputExistsError, OutputWriteError, UnsafeOutputError, OutputLockedError: see :mod:`hub_dfq.outputs`.

        Example:
            >>> hub_dfq.synthesize("default", "bns", num_images=64).save_pretrained("bns-64")  # doctest: +SKIP
        """
        return self._save(out_dir, overwrite=overwrite, repo_id=repo_id, link=False)

    def _save(self, out_dir: str | os.PathLike[str], *, overwrite: bool, repo_id: str | None, link: bool) -> Path:
        self._check_unchanged()
        source = self.folder
        manifest = _finished_manifest(source)
        with reserve_folder(out_dir, kind="dataset", overwrite=overwrite) as out:
            with staged(out) as staging:
                for record in manifest["shards"]:
                    target = staging / record["file"]
                    _copy(source / record["file"], target, link=link)
                    if file_sha256(target) != record.get("sha256"):
                        raise DatasetError(f"{source / record['file']} changed since it was written: run the same "
                                           "synthesize call with `resume=True` to make it again")
                for name in (MANIFEST, PREVIEW, CARD):
                    _copy(source / name, staging / name, link=link)
                if repo_id is not None:
                    write_card(staging, manifest, repo_id=repo_id)
            return out.path

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str | None = None,
                    **datasets_options: Any) -> str:
        """Upload the dataset folder to a Hub dataset repo in one commit, its card naming ``repo_id``.

        The files ``synthesize(..., push_to_hub=repo_id)`` uploads, from a temporary copy (the local
        folder is left as it is). Overrides ``datasets.Dataset.push_to_hub``: see the module docstring.

        Args:
            repo_id: ``ORG/NAME`` of the dataset repo (created if needed).
            private: create the repo private (an existing repo keeps its visibility).
            token: Hub token (default: the logged-in one / ``HF_TOKEN``).
            revision: branch to commit to (created if missing).
            commit_message: summary of the commit.
            datasets_options: keywords of ``datasets.Dataset.push_to_hub``, accepted when they describe this
                folder (``split="train"``, ``config_name="default"``, ...).

        Returns:
            The URL of the dataset repo.

        Raises:
            ConfigError: a ``datasets`` option that would need another layout, or transformed rows.
            PublishError: no token, no write access or a failed upload (nothing partial is committed).

        Example:
            >>> hub_dfq.synthesize("default", "bns", num_images=64).push_to_hub("me/r20-bns-64")  # doctest: +SKIP
        """
        _check_datasets_options(datasets_options)
        with tempfile.TemporaryDirectory(prefix="hub-dfq-push-") as tmp:
            # named like the source: the default commit message names the folder, as synthesize's push does
            folder = self._save(Path(tmp) / self.folder.name, overwrite=False, repo_id=repo_id, link=True)
            return push_dataset_folder(folder, repo_id, private=private, token=token, revision=revision,
                                       commit_message=commit_message)


def _check_datasets_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(_SAME_LAYOUT))
    if unknown:
        raise TypeError(f"SyntheticDataset.push_to_hub() got unexpected keyword argument(s) {unknown}")
    other = {k: v for k, v in options.items() if v not in _SAME_LAYOUT[k]}
    if other:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(other.items()))
        raise ConfigError(f"{shown}: hub-dfq's push_to_hub uploads the dataset folder as synthesize wrote it (split "
                          "train, config default, its own shards and card); for datasets' own upload with these "
                          "options call `datasets.Dataset.push_to_hub(ds, REPO, ...)`")


def _copy(source: Path, target: Path, *, link: bool) -> None:
    if not source.is_file():
        raise DatasetError(f"{source} is missing: the dataset folder is incomplete; run the same synthesize call "
                           "with `resume=True` to finish it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:  # a temporary copy to upload: a hard link costs no space (files are replaced, never edited, here)
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


def _finished_manifest(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(manifest.get("shards"), list):
        raise DatasetError(f"{folder} has no readable generation.json: it is not a synthetic dataset hub-dfq wrote "
                           "(hub_dfq.load_images reads any dataset)")
    if not manifest.get("complete"):
        raise DatasetError(f"{folder} holds an interrupted run: finish it with the same synthesize call and "
                           "`resume=True`")
    return manifest


def _resolve(spec: str | os.PathLike[str], *, revision: str | None, token: str | bool | None) -> Path:
    """The local folder of a dataset spec, downloading a Hub dataset repo."""
    text = os.fspath(spec).strip()
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
        if not Path(text).expanduser().is_dir():
            raise DatasetError(f"dataset folder {text} does not exist")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    name, _, at = text.partition("@")
    if not _REPO_ID.match(name) or text.startswith((".", "/", "~")):
        raise DatasetError(f"{text!r} is neither a dataset folder nor a Hub dataset id: use a folder, "
                           "'local-dir:PATH' or 'ORG/NAME[@REVISION]'")
    from huggingface_hub import snapshot_download  # why: only a Hub spec needs it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, repo_type="dataset", revision=at or revision, token=token))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise DatasetError(f"cannot download the dataset repo {name} ({type(err).__name__}): check the id, the "
                           "revision and your token (`hf auth login`)") from err
