"""Pushing a finished synthetic dataset folder to the Hub as one commit, identical to the local folder.

A thin check over :func:`hub_dfq.publish.push_folder` (the one upload path of hub-dfq): it refuses a
folder that is not a finished dataset (no shards, or an interrupted run) before anything is sent.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import PublishError
from ..publish import push_folder
from .writer import read_manifest

logger = logging.getLogger(__name__)

__all__ = ["push_dataset_folder"]


def push_dataset_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                        revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a finished dataset folder (``data/``, ``README.md``, ...) to a Hub dataset repo in one commit.

    The repository is created if needed; files already there and not in the folder are kept.

    Args:
        folder: the local dataset repository folder.
        repo_id: ``ORG/NAME`` of the dataset repository.
        private: create the repository as private (an existing repository keeps its visibility).
        token: Hub token (default: the logged-in one / ``HF_TOKEN``).
        revision: branch to commit to (created from the default branch if missing); default ``main``.
        commit_message: summary of the commit.

    Returns:
        The URL of the dataset repository.

    Raises:
        PublishError: the folder is not a finished dataset, or the Hub refused or failed; nothing is
            committed and the local folder is unchanged.

    Example:
        >>> push_dataset_folder("out/bns-resnet20", "me/resnet20-bns", private=True)  # doctest: +SKIP
        'https://huggingface.co/datasets/me/resnet20-bns'
    """
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / "data").glob("*.parquet")):
        raise PublishError(f"{folder} is not a finished dataset folder (no data/*.parquet): generate it first")
    # A folder without a readable generation.json is a hand-made dataset: not ours to judge (read_manifest logs it)
    manifest = read_manifest(folder) or {}
    if not manifest.get("complete", True):
        raise PublishError(f"{folder} holds an interrupted run: finish it with `resume=True` before pushing")
    message = commit_message or f"Upload synthetic dataset {folder.name} (hub-dfq)"
    result = push_folder(folder, repo_id, repo_type="dataset", private=private, token=token, revision=revision,
                         commit_message=message)
    return result.url
