"""One writer per output: an advisory lock file beside every folder, file or cache entry hub-dfq writes.

The lock is ``fcntl.flock`` on ``.<name>.hub-dfq.lock`` next to the target. The kernel releases it
when its holder exits, however it exits (SIGKILL included), so a lock left by a killed run is never
"stale" for long: the next run simply takes it over. The file holds the holder's pid, command line and
start time, which is what a second writer's error message shows. Locks are re-entrant within a
process (the CLI takes the lock of ``--out`` before any work, and the library takes it again when it
writes), and the lock file is removed when the last holder releases it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputLockedError, OutputWriteError

try:  # why: fcntl is POSIX-only; elsewhere hub-dfq runs without locks (and says so once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["LOCK_SUFFIX", "lock_path", "hold", "holder", "is_held"]

LOCK_SUFFIX = ".hub-dfq.lock"

_HELD: dict[Path, list[Any]] = {}  # lock file -> [file descriptor, depth]
_GUARD = threading.Lock()
_WARNED = False


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``.<name>.hub-dfq.lock`` in the same folder."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _command() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(("hub-dfq", "__main__.py"))):
        argv[0] = "hub-dfq"
    return shlex.join(argv)[:300]


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):  # a lock file being written, or not ours: no details to show
        return {}
    return data if isinstance(data, dict) else {}


def holder(target: str | os.PathLike[str]) -> dict[str, Any]:
    """What the lock file of ``target`` says about its holder (``pid``, ``command``, ``started``); may be empty."""
    try:
        fd = os.open(lock_path(target), os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def _describe(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "another hub-dfq process"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"another hub-dfq process (pid {info['pid']}, started {when}: {info.get('command', '?')})"


def _acquire(path: Path, target: Path, what: str, argument: str | None) -> int:
    """Open and lock ``path``; retried when the file was replaced between the open and the lock."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputWriteError(f"cannot create the lock file {path} ({err.strerror or err}): make "
                                   f"{path.parent} writable" + (f" or choose another `{argument}`" if argument else "")
                                   ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            instead = f", or choose another `{argument}`" if argument else ""
            raise OutputLockedError(
                f"{target} ({what}) is being written by {_describe(info)}: wait for it to finish{instead}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous holder removed the file after we opened it
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def hold(target: str | os.PathLike[str], *, what: str = "output", argument: str | None = None) -> Iterator[Path]:
    """Hold the lock of ``target`` for the duration of the block.

    Args:
        target: the folder, file or cache entry to be written (it need not exist yet).
        what: how the error message names it (``"output folder"``, ``"synthetic-data cache entry"``).
        argument: the API argument that chose ``target``, named in the error message.

    Yields:
        The lock file.

    Raises:
        OutputLockedError: another live process holds the lock (the message names it).
    """
    global _WARNED
    path = lock_path(target)
    if fcntl is None:  # pragma: no cover - Windows
        if not _WARNED:
            logger.warning("no fcntl on this system: concurrent hub-dfq runs are not prevented from sharing outputs")
            _WARNED = True
        yield path
        return
    with _GUARD:
        entry = _HELD.get(path)
        if entry is not None:
            entry[1] += 1
        else:
            fd = _acquire(path, Path(os.path.abspath(target)), what, argument)
            previous = _read(fd)
            if previous.get("pid") and previous["pid"] != os.getpid() and not _alive(previous["pid"]):
                logger.info("taking over the lock of %s from pid %s, which is no longer running", target,
                            previous["pid"])
            record = json.dumps({"pid": os.getpid(), "command": _command(), "started": time.time()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            _HELD[path] = entry = [fd, 1]
    try:
        yield path
    finally:
        with _GUARD:
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[path]
                try:
                    os.unlink(path)  # before unlocking: a waiting opener then retries on a fresh file
                except OSError:
                    pass
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


def is_held(target: str | os.PathLike[str]) -> bool:
    """Whether this process holds the lock of ``target``."""
    return lock_path(target) in _HELD
