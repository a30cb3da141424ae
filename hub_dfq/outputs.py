"""Where hub-dfq writes: checked before any work, replaced atomically, and never a file it did not write lost.

Every writer (synthetic dataset folders, quantized checkpoints, audit reports, ONNX files, ``--json``
files) goes through this module:

- :func:`check_folder` / :func:`check_file` validate a target before any work starts: not the current
  folder, a parent of it, the home folder, a filesystem root, a mount point or a symbolic link; a
  folder where a folder is expected (a file where a file is); writable; and, for a folder, new, empty
  or one hub-dfq wrote.
- A folder hub-dfq writes carries :data:`MARKER` (``.hub-dfq.json``), the list of files it wrote.
  Only such a folder is ever replaced (``overwrite=True``), and only the listed files go: every other
  file in it is carried into the new folder (hard-linked, or copied where links are impossible).
- :func:`staged` writes the new content into a folder beside the target and swaps it in with one
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so a crash at any moment leaves either the old folder or the
  new one, complete. Without it (another OS or a file system that refuses the flag) the swap is two
  renames, and :func:`reserve_folder` restores the old folder if a crash fell between them.
- :func:`write_file` writes single files through a per-process temporary beside them (fsynced, then
  renamed), so a file is never seen half-written and two runs never touch each other's temporaries.
- :func:`reserve_folder` holds the target's lock (:mod:`hub_dfq.locks`) while a command writes it.

An ``OSError`` while writing (disk full, permissions) becomes :class:`~hub_dfq.errors.OutputWriteError`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import __version__
from .errors import HubDfqError, OutputExistsError, OutputWriteError, UnsafeOutputError
from .locks import check_unlocked, hold

logger = logging.getLogger(__name__)

__all__ = ["MARKER", "TMP_SUFFIX", "UPLOAD_IGNORE", "KINDS", "OutputFolder", "check_folder", "reserve_folder",
           "staged", "declare", "read_marker", "check_file", "write_file", "write_text", "write_errors",
           "temp_path", "is_temp"]

MARKER = ".hub-dfq.json"
TMP_SUFFIX = ".hub-dfq.tmp"
UPLOAD_IGNORE = [MARKER, f"*{TMP_SUFFIX}"]  # never part of a published repository
KINDS = {"checkpoint": "a quantized checkpoint", "dataset": "a synthetic dataset", "audit": "an audit report",
         "scores": "a scored dataset"}
_NEW, _OLD = "hub-dfq-new", "hub-dfq-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# ---- names ---------------------------------------------------------------------------------------

def temp_path(path: str | os.PathLike[str]) -> Path:
    """A temporary name beside ``path`` that only this process uses: ``.<name>.<pid>.hub-dfq.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def is_temp(name: str) -> bool:
    """Whether a file name is a hub-dfq temporary (left by a killed run when found later)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _beside(target: Path, tag: str, pid: int | None = None) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid() if pid is None else pid}"


def _abs(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


# ---- checks --------------------------------------------------------------------------------------

def _refuse_unsafe(target: Path, argument: str) -> None:
    if target.is_symlink():
        raise UnsafeOutputError(f"{target} is a symbolic link: name the folder itself as `{argument}`")
    resolved = target.resolve()
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:  # the current folder was deleted: nothing to protect there
        cwd = None
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known (no $HOME, no passwd entry)
        home = None
    if resolved == Path(resolved.anchor):
        what = "a filesystem root"
    elif resolved == cwd:
        what = "the current folder"
    elif cwd is not None and resolved in cwd.parents:
        what = "a parent of the current folder"
    elif resolved == home:
        what = "your home folder"
    elif resolved.is_dir() and os.path.ismount(resolved):
        what = "a mount point (hub-dfq replaces folders by renaming, which a mount point does not allow)"
    else:
        return
    raise UnsafeOutputError(f"{target} is {what}: hub-dfq never writes its results there; name a new sub-folder "
                            f"as `{argument}`, e.g. {target / 'hub-dfq-out'}")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and not path.is_symlink():
        path = path.parent
    if not path.is_dir():
        raise OutputExistsError(f"{path} is a file, so nothing can be created under it: choose another location")
    return path


def _probe(folder: Path, argument: str) -> None:
    """Create and remove a file in ``folder``: the only test of writability root cannot fool."""
    probe = folder / f".hub-dfq-probe.{os.getpid()}{TMP_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise OutputWriteError(f"cannot write in {folder} ({err.strerror or err}): make it writable or choose "
                               f"another `{argument}`") from err


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's ``.hub-dfq.json`` (what hub-dfq wrote there), or ``None`` if it has none or it is unreadable."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or data.get("kind") not in KINDS:
        return None
    return data


def _marker_text(kind: str, files: Iterable[str], *, staging: bool = False) -> str:
    data = {"written_by": f"hub-dfq {__version__}", "kind": kind, "files": sorted(set(files)),
            "note": "hub-dfq replaces the files listed here (overwrite=True) and keeps every other file"}
    if staging:
        data["staging"] = True
    return json.dumps(data, indent=1) + "\n"


def declare(folder: str | os.PathLike[str], kind: str, names: Iterable[str]) -> None:
    """Record in the folder's marker that hub-dfq writes ``names`` (relative paths) there; before writing them."""
    folder = Path(folder)
    marker = read_marker(folder)
    files = set(marker["files"]) if marker and marker.get("kind") == kind else set()
    new = files | set(names)
    if marker is None or new != files:
        write_text(folder / MARKER, _marker_text(kind, new))


@dataclass(frozen=True)
class OutputFolder:
    """A validated output folder.

    Args:
        path: the absolute target.
        kind: what is written (a key of :data:`KINDS`).
        state: ``"absent"``, ``"empty"`` or ``"ours"`` (holds an earlier hub-dfq result of this kind).
        argument: the API argument that named it (for messages).
    """

    path: Path
    kind: str
    state: str
    argument: str = "out_dir"

    @property
    def holds_result(self) -> bool:
        return self.state == "ours"


# Longest name of one path component on Linux, macOS and Windows file systems (bytes).
NAME_MAX = 255


def _named(path: str | os.PathLike[str], argument: str) -> Path:
    """The absolute path of an output, refused if it names nothing or a component is too long to exist.

    why: an empty name would be skipped by callers that test ``if out_dir`` (no output, no error), and a
    300-character name fails deep in ``stat`` with ENAMETOOLONG, an internal error instead of a usage error.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise UnsafeOutputError(f"`{argument}` is empty: name a file or folder")
    target = _abs(path)
    long = next((part for part in target.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise OutputWriteError(f"the name {long[:40]}... in `{argument}` is {len(os.fsencode(long))} bytes long, more "
                               f"than file systems allow ({NAME_MAX}): choose a shorter `{argument}`")
    return target


def _check_location(path: str | os.PathLike[str], argument: str) -> Path:
    """What does not depend on the folder's content: a safe place, not a file, room beside it. Returns the path."""
    target = _named(path, argument)
    _refuse_unsafe(target, argument)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} is a file: `{argument}` must name a folder (new, empty, or one hub-dfq "
                                "wrote)")
    if target.exists():
        _probe(target.parent, argument)  # the staging folder and the lock go beside the target
    else:
        _probe(_existing_ancestor(target.parent), argument)
    return target


def check_folder(path: str | os.PathLike[str], *, kind: str, overwrite: bool = False, resume: bool = False,
                 argument: str = "out_dir", owned: bool = False) -> OutputFolder:
    """Validate an output folder before any work: see the module docstring for the rules.

    Args:
        path: the folder to write.
        kind: what will be written there (a key of :data:`KINDS`).
        overwrite: an earlier result of this kind may be replaced.
        resume: an earlier result of this kind may be continued (the caller checks it is the same run).
        argument: the API argument that named the folder, for messages.
        owned: the folder is hub-dfq's by construction (a cache entry), marker or not.

    Raises:
        UnsafeOutputError: the current folder, a parent of it, the home folder, a root, a mount point, a link.
        OutputLockedError: another running process holds the folder's lock (checked before its content).
        OutputExistsError: a file; a folder holding files hub-dfq did not write, or another kind of result; an
            earlier result and neither ``overwrite`` nor ``resume``.
        OutputWriteError: the folder (or where it would be created) is not writable.
    """
    target = _check_location(path, argument)
    check_unlocked(target, what=f"output folder of {KINDS[kind]}" if not owned else "cache entry", argument=argument)
    if not target.exists():
        return OutputFolder(target, kind, "absent", argument)
    names = sorted(entry.name for entry in os.scandir(target))
    if not names:
        _probe(target, argument)
        return OutputFolder(target, kind, "empty", argument)
    marker = read_marker(target)
    if marker is None and not owned:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise OutputExistsError(f"{target} holds files hub-dfq did not write ({shown}): hub-dfq never writes beside "
                                f"or replaces them; choose a new or empty `{argument}`")
    if marker is not None and marker["kind"] != kind:
        raise OutputExistsError(f"{target} holds {KINDS[marker['kind']]}, not {KINDS[kind]}: choose another "
                                f"`{argument}`")
    _probe(target, argument)
    if not (overwrite or resume):
        again = "`resume=True` to continue that run with the same arguments, " if kind == "dataset" else ""
        raise OutputExistsError(f"{target} already holds {KINDS[kind]}: pass {again}`overwrite=True` to replace it "
                                f"(files hub-dfq did not write there are kept), or choose another `{argument}`")
    return OutputFolder(target, kind, "ours", argument)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _result_file(target: Path) -> Path | None:
    """The folder hub-dfq wrote whose marker lists ``target`` (a file of a checkpoint, dataset or report)."""
    for folder in target.parents:
        if target.name == MARKER and folder == target.parent:
            return folder
        marker = read_marker(folder)
        if marker is not None and not marker.get("staging") and target.relative_to(folder).as_posix() in \
                marker["files"]:
            return folder
    return None


def check_file(path: str | os.PathLike[str], *, overwrite: bool = False, argument: str = "path",
               inputs: Iterable[str | os.PathLike[str]] = (), outputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Validate an output file before any work (every single file hub-dfq writes: ``--json``, ONNX files).

    Whatever ``overwrite`` says, a file is never written over a symbolic link, a FIFO or another
    non-regular file, a file of a result hub-dfq wrote (listed in a folder's ``.hub-dfq.json``), a
    file the command reads (``inputs``: an input file, or an existing file inside an input folder) or
    anything inside a folder the command writes (``outputs``). An existing regular file is replaced
    only with ``overwrite``.

    Raises:
        UnsafeOutputError: a link, a non-regular file, an input, part of an output or of a hub-dfq result.
        OutputExistsError: ``path`` is a folder, or exists and ``overwrite`` is false.
        OutputWriteError: the file cannot be created there.
    """
    target = _named(path, argument)
    if str(os.fspath(path)).endswith(("/", os.sep)):  # `--out newdir/` means a folder: never a file named newdir
        raise OutputExistsError(f"{os.fspath(path)} ends with a '/', so it names a folder: `{argument}` must name a "
                                "file (drop the '/')")
    if target.is_symlink():
        raise UnsafeOutputError(f"{target} is a symbolic link: hub-dfq never writes through or replaces links; name "
                                f"a regular file as `{argument}`")
    if target.is_dir():
        raise OutputExistsError(f"{target} is a folder: `{argument}` must name a file")
    if target.exists() and not target.is_file():
        raise UnsafeOutputError(f"{target} is not a regular file (a FIFO, socket or device): hub-dfq never replaces "
                                f"it; choose another `{argument}`")
    resolved = target.resolve()
    for out in outputs:
        folder = _abs(out)
        if _within(target, folder) or _within(resolved, folder.resolve()):
            raise UnsafeOutputError(f"{target} is inside {folder}, which this command writes: choose a `{argument}` "
                                    "outside it")
    for item in inputs:
        source = _abs(item)
        if not (source.exists() or source.is_symlink()):
            continue
        source = source.resolve()
        if resolved == source or (source.is_dir() and target.exists() and _within(resolved, source)):
            where = "read by this command" if resolved == source else f"inside {item}, which this command reads"
            raise UnsafeOutputError(f"{target} is {where}: hub-dfq never replaces what it reads; choose another "
                                    f"`{argument}`")
    owner = _result_file(resolved)
    if owner is not None:
        kind = KINDS.get((read_marker(owner) or {}).get("kind"), "a result")
        raise UnsafeOutputError(f"{target} is part of {kind} hub-dfq wrote in {owner}: hub-dfq never replaces it on "
                                f"its own; choose another `{argument}`")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists: pass `overwrite=True` to replace it, or choose another "
                                f"`{argument}`")
    _probe(_existing_ancestor(target.parent), argument)
    return target


# ---- writing -------------------------------------------------------------------------------------

@contextmanager
def write_errors(target: str | os.PathLike[str], hint: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``target`` into one :class:`OutputWriteError` that says what to do."""
    try:
        yield
    except HubDfqError:
        raise
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise OutputWriteError(f"cannot write {target} ({reason}): nothing that existed before was changed; free "
                               f"space or fix permissions{hint}, then run again") from err


def _fsync(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a folder; the data is written either way
        if not folder:
            raise
        logger.debug("could not fsync %s: %s", path, err)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], write: Callable[[Path], None], *, hint: str = "") -> Path:
    """Write one file atomically: ``write(tmp)`` fills a per-process temporary beside ``path``, which is then
    fsynced and renamed onto ``path``. Readers see the old file or the whole new one; the temporary never stays.

    Raises:
        OutputWriteError: the file cannot be written (disk full, permissions).
    """
    path = Path(path)
    tmp = temp_path(path)
    with write_errors(path, hint):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError as err:  # the write error says what went wrong; a stuck temporary only costs space
                logger.warning("could not remove the temporary file %s: %s", tmp, err)
        _fsync(path.parent, folder=True)
    return path


def write_text(path: str | os.PathLike[str], text: str, *, hint: str = "") -> Path:
    """:func:`write_file` for text (UTF-8)."""
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), hint=hint)


# ---- folders -------------------------------------------------------------------------------------

def _files(folder: Path) -> list[str]:
    """Relative paths of everything in ``folder`` that is not a directory (links included), marker excluded."""
    out = []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for name in list(dirs):
            if (base / name).is_symlink():
                dirs.remove(name)
                names.append(name)
        out += [(base / n).relative_to(folder).as_posix() for n in names]
    return sorted(p for p in out if p != MARKER)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links: a copy keeps the bytes and the metadata
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_foreign(old: Path, new: Path) -> list[str]:
    """Put every file of ``old`` that hub-dfq did not write into ``new`` (same relative path); returns them."""
    marker = read_marker(old) or {"files": []}
    ours = set(marker["files"])
    carried = []
    for rel in _files(old):
        if rel in ours or is_temp(Path(rel).name):
            continue
        dst = new / rel
        if dst.exists() or dst.is_symlink():
            raise OutputExistsError(f"{old / rel} was not written by hub-dfq and the new result has a file of the "
                                    "same name: move it out of the folder, then run again")
        _link_or_copy(old / rel, dst)
        carried.append(rel)
    for root, dirs, _ in os.walk(old):  # empty folders the user made stay too
        for name in dirs:
            rel = (Path(root) / name).relative_to(old)
            if not (Path(root) / name).is_symlink():
                (new / rel).mkdir(parents=True, exist_ok=True)
    return carried


def _discard_old(old: Path, new: Path) -> None:
    """Remove a replaced folder: the files hub-dfq wrote, and the others only once they are safe in ``new``."""
    marker = read_marker(old) or {"files": []}
    ours = set(marker["files"]) | {MARKER}
    kept = []
    for rel in _files(old) + ([MARKER] if (old / MARKER).exists() else []):
        path = old / rel
        if rel in ours or is_temp(path.name) or (new / rel).exists() or (new / rel).is_symlink():
            path.unlink()
        else:
            kept.append(rel)
    for root, dirs, _ in sorted(os.walk(old), key=lambda t: -len(t[0])):
        for name in dirs:
            try:
                (Path(root) / name).rmdir()
            except OSError:  # not empty: holds a kept file
                pass
    try:
        old.rmdir()
    except OSError:
        logger.warning("kept %s: it holds files hub-dfq did not write that are not in %s (%s)", old, new,
                       ", ".join(kept[:5]))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the kernel or this file system cannot do it
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def _swap_in(staging: Path, target: Path) -> None:
    """Make ``staging`` the folder at ``target``; a replaced folder is discarded afterwards."""
    if not target.exists() or not any(os.scandir(target)):
        os.rename(staging, target)  # rename(2) also replaces an empty folder in one step
    else:
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode))  # the new folder keeps the old one's permissions
        if _exchange(staging, target):
            _discard_old(staging, target)  # the staging name now holds the old folder
        else:
            old = _beside(target, _OLD)
            os.rename(target, old)  # a crash right here is repaired by _recover: the old folder comes back
            os.rename(staging, target)
            _discard_old(old, target)
    _fsync(target.parent, folder=True)


def _leftovers(target: Path, tag: str) -> list[Path]:
    prefix = f".{target.name}.{tag}-"
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return []
    return sorted(target.parent / e.name for e in entries
                  if e.name.startswith(prefix) and e.name[len(prefix):].isdigit() and e.is_dir(follow_symlinks=False))


def _recover(target: Path) -> None:
    """Repair what a killed replacement left beside ``target`` (call with its lock held: nobody else is writing)."""
    for old in _leftovers(target, _OLD):
        if not target.exists():
            os.rename(old, target)
            logger.warning("restored %s, which an interrupted replacement had moved aside", target)
        else:
            _discard_old(old, target)
    for new in _leftovers(target, _NEW):
        if new.name.endswith(f"-{os.getpid()}"):
            continue  # this process's own staging folder (a re-entrant reservation)
        marker = read_marker(new)
        if marker is not None and marker.get("staging") or not any(os.scandir(new)):
            shutil.rmtree(new)  # an unfinished staging folder of a killed run
        elif marker is not None:  # finished but not swapped in (killed during the swap): ours, and replaced
            _discard_old(new, target)


@contextmanager
def reserve_folder(path: str | os.PathLike[str], *, kind: str, overwrite: bool = False, resume: bool = False,
                   argument: str = "out_dir", owned: bool = False) -> Iterator[OutputFolder]:
    """Hold an output folder's lock while the block runs, and validate it (:func:`check_folder`).

    The place is checked first (a safe path, not a file, writable beside it), then the lock is taken
    (so a second writer is told which process writes the folder), then what a killed run left beside
    the folder is repaired (a folder moved aside is put back, unfinished staging folders are removed),
    then the folder's content is checked. Re-entrant: the CLI reserves ``--out`` before any work and
    the library reserves it again when it writes.

    Raises:
        OutputLockedError: another running process writes the folder.
        (and everything :func:`check_folder` raises)
    """
    target = _check_location(path, argument)  # then the lock: a second writer hears who is writing, first
    with hold(target, what=f"output folder of {KINDS[kind]}" if not owned else "cache entry", argument=argument):
        with write_errors(target):
            _recover(target)
        yield check_folder(target, kind=kind, overwrite=overwrite, resume=resume, argument=argument, owned=owned)


@contextmanager
def staged(out: OutputFolder, *, hint: str = "") -> Iterator[Path]:
    """A fresh folder beside ``out.path`` to write the new result into; swapped in when the block ends.

    On success, the marker listing what was written is added, the files hub-dfq did not write in an
    old folder are carried over, everything is fsynced and the new folder replaces the old one in one
    step. On any error (or interruption) the staging folder is removed and the target is untouched.

    Raises:
        OutputWriteError: writing failed (disk full, permissions); the target is unchanged.
        OutputExistsError: a file hub-dfq did not write has the name of a new file.
    """
    staging = _beside(out.path, _NEW)
    with write_errors(out.path, hint):
        if staging.exists():
            shutil.rmtree(staging)  # this process's own leftover
        staging.mkdir(parents=True)
        write_text(staging / MARKER, _marker_text(out.kind, [], staging=True))
    try:
        with write_errors(out.path, hint):
            yield staging
            written = _files(staging)
            if out.path.is_dir():
                _carry_foreign(out.path, staging)
            write_text(staging / MARKER, _marker_text(out.kind, written))
            for rel in _files(staging):
                if not (staging / rel).is_symlink():
                    _fsync(staging / rel)
            _swap_in(staging, out.path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
