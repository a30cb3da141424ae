"""argparse ``type`` functions that refuse out-of-range numbers when the command line is read.

A batch size of 0 loops for ever, a negative one fails deep in torch, a NaN learning rate trains
nothing: every number a command takes is checked here (exit code 2, one line) before any work.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["MAX_IMAGES", "SEED_MAX", "count", "number"]

SEED_MAX = 2**32 - 1  # numpy's generators take seeds below 2^32
# why: more images than any dataset hub-dfq makes (ImageNet's training set is 1.3 million); a typo of 10^12 planned
# shards and counters for ever before the first image, a hang rather than a long run
MAX_IMAGES = 100_000_000


def count(low: int = 1, high: int | None = None):
    """An argparse ``type``: an integer in ``[low, high]`` (``high`` ``None``: no upper bound).

    Out-of-range numbers are refused when the command line is read (exit code 2, one line), never
    after minutes of work: a batch size of 0 would loop for ever, a negative one fail deep in torch.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = ("a positive whole number" + ("" if high is None else f" (at most {high:,})") if low == 1
                    else f"{low} or more" if high is None else f"{low} to {high}")
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


def number(low: float = 0.0, *, strict: bool = False):
    """An argparse ``type``: a finite float ``>= low`` (``> low`` with ``strict``); NaN and Inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = "" if low == -math.inf else f" {'above' if strict else 'of at least'} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


