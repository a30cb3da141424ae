"""``hub-dfq cache list|clear``: what hub-dfq keeps in its cache, and freeing it."""

from __future__ import annotations

import argparse

from ..cache import CACHE_KINDS, cache_base, clear_cache, list_cache
from .numbers import number
from .options import add_common_options, write_json


def register(sub) -> None:
    parser = sub.add_parser("cache", help="list or clear cached synthetic datasets, audit references and saved "
                                          "progress",
                            description=f"The cache lives in {cache_base()} ($HUB_DFQ_CACHE, else $HF_HOME/hub_dfq). "
                            "Only entries hub-dfq wrote are listed or removed.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("list", "list the cache entries, newest first"), ("clear", "delete cache entries")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--kind", action="append", choices=CACHE_KINDS,
                            help="only entries of this kind (repeatable; default: all)")
        if name == "clear":
            action.add_argument("--older-than", type=number(0.0), metavar="DAYS", dest="older_than_days",
                                help="only entries not used for this many days")
        add_common_options(action)
        action.set_defaults(func=run, parser=action)


def _size(num: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000
    return f"{num} B"


def run(args: argparse.Namespace) -> int:
    kinds = tuple(args.kind or CACHE_KINDS)
    if args.action == "list":
        entries = list_cache(kinds)
        if args.json != "-":
            print(f"{len(entries)} entries, {_size(sum(e.bytes for e in entries))} in {cache_base()}")
            for e in entries:
                print(f"  {e.kind:<9} {e.key[:24]:<24}  {_size(e.bytes):>9}  {e.to_dict()['modified']}  "
                      f"{e.description}")
        write_json(args, {"root": str(cache_base()), "entries": [e.to_dict() for e in entries]})
        return 0
    removed = clear_cache(kinds, older_than_days=args.older_than_days)
    if args.json != "-":
        print(f"removed {len(removed)} entries ({_size(sum(e.bytes for e in removed))}) from {cache_base()}")
    write_json(args, {"root": str(cache_base()), "removed": [e.to_dict() for e in removed]})
    return 0
