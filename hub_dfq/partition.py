"""Which rows of a dataset each process reads in a multi-process run.

Rows are dealt out in whole *blocks* (a multiple of the forward batch size, and for audits of the
score batch size too), so every process forms exactly the batches a single process would form over
those rows, and every row keeps its index in the whole dataset (``ImageData.rows``). Counts, moment
sums and per-batch scores computed on the parts therefore combine into the single-process numbers.

- A dataset with a length (parquet, folders, downloaded Hub datasets) is cut into contiguous index
  ranges of whole blocks, balanced over the ranks.
- A streamed dataset (``IterableDataset``) is split with
  :func:`datasets.distributed.split_dataset_by_node` over blocks: rank ``r`` keeps blocks ``r``,
  ``r + world_size``, ... Every rank reads the stream's rows (cheap: images stay undecoded) and
  decodes and forwards only its own blocks. The "shards" strategy would spare the reading but not
  tell a rank where its rows sit in the whole stream, which exact batch scores need.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import datasets
from datasets.distributed import split_dataset_by_node

from .data import ImageData, RowMap
from .distributed import Distributed

__all__ = ["rank_part", "block_size"]


def block_size(*sizes: int) -> int:
    """The smallest block made of whole batches of every size in ``sizes`` (their least common multiple)."""
    return math.lcm(*(int(s) for s in sizes))


def rank_part(data: ImageData, dist: Distributed, *, block: int) -> ImageData:
    """This rank's part of ``data``: whole blocks of ``block`` rows (all of ``data`` in one process).

    Args:
        data: the whole dataset.
        dist: the process group (:func:`hub_dfq.distributed.process_group`).
        block: rows per block; a multiple of every batch size the caller forms.
    """
    if not dist.enabled:
        return data
    if data.rows is not None:
        raise ValueError(f"{data.spec} is already one process's part of a dataset")
    if data.streaming:
        blocks = split_dataset_by_node(data.dataset.batch(block), rank=dist.rank, world_size=dist.world_size,
                                       strategy="examples")
        columns = tuple(data.dataset.features)  # a tuple: `datasets` would shard a list of generator arguments
        part = datasets.IterableDataset.from_generator(_unblock, features=data.dataset.features,
                                                       gen_kwargs={"blocks": blocks, "columns": columns})
        rows = RowMap(start=dist.rank * block, block=block, stride=dist.world_size * block)
    else:
        total = len(data.dataset)
        count = math.ceil(total / block)
        first, last = dist.rank * count // dist.world_size, (dist.rank + 1) * count // dist.world_size
        start, stop = first * block, min(last * block, total)
        part = data.dataset.select(range(start, stop))
        rows = RowMap(start=start, block=block, stride=block)
    return dataclasses.replace(data, dataset=part, rows=rows)


def _unblock(blocks: Any, columns: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The rows of a stream of blocks (``datasets`` applies a node split after any ``map``, so not a map)."""
    for block in blocks:
        for values in zip(*(block[c] for c in columns)):
            yield dict(zip(columns, values))
