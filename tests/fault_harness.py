"""The machinery of the fault-injection suite (tests/test_faults.py): a sandbox, runs, checks, the table.

A fault case is a function registered with :func:`fault` (id, area, what is done, expected outcome).
It gets a :class:`Sandbox`: a project folder (the working directory, holding a user's files), a home
folder, the hub-dfq cache and room for outputs, all under one root whose every file is checksummed
before a command (:meth:`Sandbox.snapshot`) and compared after it (:meth:`Sandbox.check`).

Commands run in-process (:meth:`Sandbox.cli`, :meth:`Sandbox.api`, with the CLI's own rules: a
HubDfqError is exit code 2, anything else 1) or in a forked child (:meth:`Sandbox.fork`), which can
be killed with SIGKILL, killed at an injected point (:func:`kill_at`), or limited in the size of the
files it may write (RLIMIT_FSIZE: a real size-limited writer, whatever library writes).

With ``HUB_DFQ_FAULT_TABLE=PATH`` the suite writes the table of the faults it tried (for
docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

LITTER = (".hub-dfq.lock", ".hub-dfq.tmp", ".hub-dfq-new-", ".hub-dfq-old-", ".hub-dfq-probe")
TABLE_ENV = "HUB_DFQ_FAULT_TABLE"


# ---- the table -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fault:
    """One row of the table: what is done to hub-dfq, and what must come of it."""

    id: str
    area: str
    what: str
    expected: str
    run: Callable[["Sandbox"], None]
    slow: bool = False


FAULTS: list[Fault] = []
OBSERVED: dict[str, str] = {}


def fault(id: str, *, area: str, what: str, expected: str, slow: bool = False):
    """Register a fault case (see the module docstring)."""

    def register(fn: Callable[["Sandbox"], None]) -> Callable[["Sandbox"], None]:
        assert id not in {f.id for f in FAULTS}, f"duplicate fault id {id}"
        FAULTS.append(Fault(id, area, what, expected, fn, slow))
        return fn

    return register


def table_markdown() -> str:
    """The table of faults, in the order they are defined, with what was observed."""
    lines = ["| id | area | what is done | expected outcome | observed |", "|---|---|---|---|---|"]
    for f in FAULTS:
        observed = OBSERVED.get(f.id, "not run")
        lines.append(f"| `{f.id}` | {f.area} | {f.what} | {f.expected} | {observed} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- fault table: begin -->", "<!-- fault table: end -->"


def write_table() -> None:
    """Write the table to the file ``$HUB_DFQ_FAULT_TABLE`` names: between its markers if it has them, else whole."""
    path = os.environ.get(TABLE_ENV)
    if not path:
        return
    target = Path(path)
    text = target.read_text() if target.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = f"{head}{BEGIN}\n{table_markdown()}{END}{tail}"
    else:
        text = table_markdown()
    target.write_text(text)


# ---- results and checks ----------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """What a command did: exit code (negative: killed by that signal), stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def message(self) -> str:
        """hub-dfq's own stderr lines (errors and notices; progress bars and log lines left out)."""
        return "\n".join(line for line in self.err.splitlines() if line.startswith("hub-dfq "))


def digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_dir():
        return "dir"
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` (``dir`` for folders) of everything under ``root``."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(base) / name
            out[path.relative_to(root).as_posix()] = digest(path)
    return out


def litter(root: Path) -> list[str]:
    """hub-dfq's own temporaries, staging folders, probes and lock files left under ``root``."""
    return sorted(p for p in tree(root) if any(mark in Path(p).name for mark in LITTER))


# ---- the sandbox -----------------------------------------------------------------------------------

class Sandbox:
    """Folders of one fault case, and ways to run hub-dfq in them (see the module docstring).

    Args:
        root: an empty folder.
        monkeypatch: the test's monkeypatch (cwd, environment and patches are undone after the case).
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.mp = monkeypatch
        self.project = root / "project"
        self.home = root / "home"
        self.cache = root / "cache"
        for folder in (self.project / "src", self.home, self.cache):
            folder.mkdir(parents=True)
        (self.project / "README.md").write_text("# my project\n")
        (self.project / "notes.txt").write_text("hours of work\n")
        (self.project / "src" / "main.py").write_text("print('hello')\n")
        (self.home / ".bashrc").write_text("export PATH\n")
        monkeypatch.chdir(self.project)
        monkeypatch.setenv("HOME", str(self.home))
        monkeypatch.setenv("HUB_DFQ_CACHE", str(self.cache))
        self.steps: list[str] = []  # for the table: exit code (and message) of every checked command
        self.last_error = ""  # the last checked error line, whole
        self.held: set[str] = set()  # lock files the case itself holds (not hub-dfq's leftovers)
        self._teardown: list[Callable[[], None]] = []

    @property
    def observed(self) -> str:
        """What the checked commands did, in order (consecutive repeats folded)."""
        folded: list[str] = []
        for step in self.steps:
            if not folded or folded[-1] != step:
                folded.append(step)
        return ", then ".join(folded)

    # -- state
    def snapshot(self) -> dict[str, str]:
        return tree(self.root)

    def path(self, rel: str) -> Path:
        return self.project / rel

    # -- running
    def cli(self, *argv: str) -> Result:
        """``hub-dfq ARGV`` in this process (working directory: the project)."""
        from hub_dfq.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return Result(code, out.getvalue(), err.getvalue())

    def api(self, fn: Callable[[], Any], *, builtin: type[BaseException] | None = None) -> Result:
        """Call ``fn`` under the CLI's rules: a HubDfqError is exit code 2 and one line, anything else 1.

        Args:
            builtin: the builtin exception the error must also be (hub-dfq errors inherit one).
        """
        from hub_dfq.errors import HubDfqError

        try:
            fn()
        except HubDfqError as err:
            if builtin is not None:
                assert isinstance(err, builtin), f"{type(err).__name__} is not a {builtin.__name__}"
            return Result(2, "", f"hub-dfq api: error: {' '.join(str(err).split())}\n")
        except Exception as err:  # noqa: BLE001 - reported as the CLI would: an internal error
            return Result(1, "", f"hub-dfq api: internal error: {type(err).__name__}: {err}\n")
        return Result(0, "", "")

    def fork(self, *argv: str, setup: Callable[[], None] | None = None, fsize: int | None = None,
             wait: bool = True, timeout: float = 300) -> "Child":
        """``hub-dfq ARGV`` in a forked child (one torch thread); ``setup`` runs in the child first."""
        child = Child(self.root, list(argv), setup, fsize)
        child.start()
        if wait:
            child.wait(timeout)
        return child

    def on_teardown(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the case ends, pass or fail (newest first)."""
        self._teardown.append(fn)

    def teardown(self) -> None:
        while self._teardown:
            self._teardown.pop()()

    # -- read-only folders (root ignores permissions: an immutable folder stops it too)
    def read_only(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        immutable = os.geteuid() == 0 and shutil.which("chattr") is not None

        def restore() -> None:
            if immutable:
                subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
            folder.chmod(0o755)

        self.on_teardown(restore)
        if _writable(folder) and immutable:
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if _writable(folder):
            pytest.skip("cannot make a read-only folder here (root without chattr +i)")
        return folder

    def hold_lock(self, target: Path, command: str) -> None:
        """Hold the lock of ``target`` as another hub-dfq process would (its own open file description)."""
        import fcntl

        from hub_dfq.locks import lock_path

        path = lock_path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "started": time.time()}).encode())

        self.held.add(path.relative_to(self.root).as_posix())

        def release() -> None:
            path.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        self.on_teardown(release)

    # -- the checks every case makes
    def check(self, result: Result, *, code: int, message: str | None = None, before: dict[str, str] | None = None,
              changed: tuple[str, ...] = (), allow_litter: bool = False) -> None:
        """Exit code, one line of hub-dfq output naming ``message``, no traceback, and nothing lost.

        Args:
            result: what the command did.
            code: the expected exit code.
            message: a fragment the error line must contain (for ``code != 0``).
            before: :meth:`snapshot` taken before the command: every path in it must still exist with the
                same bytes, except under the ``changed`` prefixes (paths in the project folder: outputs the
                command is meant to replace).
            allow_litter: hub-dfq's own leftovers are expected (a killed run, before its rerun).
        """
        text = result.out + result.err
        assert "Traceback" not in text, text[-3000:]
        assert result.code == code, f"exit code {result.code}, expected {code}: {text[-3000:]}"
        if code < 0:
            self.steps.append(f"killed by signal {-code}")
        elif code != 0:
            lines = [line for line in result.message.splitlines() if ": error:" in line or "internal error" in line]
            assert len(lines) == 1, f"expected one error line, got {result.err[-3000:]!r}"
            if message is not None:
                assert message in lines[0], f"{message!r} not in {lines[0]!r}"
            self.steps.append(f"exit {code}: “{_short(lines[0], self.root)}”")
            self.last_error = lines[0]
        else:
            self.steps.append("exit 0")
        if before is not None:
            after = self.snapshot()
            changed = tuple(f"project/{c}" for c in changed)
            lost = [p for p, d in before.items()
                    if not any(p == c or p.startswith(c.rstrip("/") + "/") for c in changed)
                    and not any(mark in Path(p).name for mark in LITTER)  # a killed run's leftovers may go
                    and after.get(p) != d]
            assert not lost, f"changed or lost: {lost[:10]}"
        if not allow_litter:
            left = [p for p in litter(self.root) if p not in self.held]
            assert not left, f"hub-dfq left {left}"


def _short(line: str, root: Path, limit: int = 100) -> str:
    """The message, without the sandbox's paths, pids and times (the table must not change between runs)."""
    text = line.split(": error: ", 1)[-1].split(": internal error: ", 1)[-1]
    text = text.replace(str(root / "project") + "/", "").replace(str(root), "…")
    text = re.sub(r"pid \d+", "pid N", re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "T", text))
    text = re.sub(r"\.hub-dfq-(new|old)-\d+", r".hub-dfq-\1-N", text).replace("|", "/")
    return (text[: limit - 1] + "…") if len(text) > limit else text


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


# ---- forked children -----------------------------------------------------------------------------

def _child_main(root: str, argv: list[str], setup, fsize: int | None, out: str, err: str) -> None:
    """Runs in the forked child: own stdout/stderr files, one torch thread, faults armed, then the CLI."""
    for fd, name in ((1, out), (2, err)):
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    import torch

    torch.set_num_threads(1)
    if setup is not None:
        setup()
    if fsize is not None:  # a size-limited writer: writes past fsize bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    from hub_dfq.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """A forked ``hub-dfq`` run (see :meth:`Sandbox.fork`)."""

    def __init__(self, root: Path, argv: list[str], setup, fsize: int | None):
        self.argv = [str(a) for a in argv]
        tag = f"{time.monotonic_ns()}"
        self.out_file = root.parent / f"child-{tag}.out"
        self.err_file = root.parent / f"child-{tag}.err"
        context = multiprocessing.get_context("fork")
        self.process = context.Process(target=_child_main, args=(str(root), self.argv, setup, fsize,
                                                                  str(self.out_file), str(self.err_file)))

    def start(self) -> None:
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 300) -> "Child":
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"hub-dfq {' '.join(self.argv)} did not finish in {timeout} s")
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.join()

    @property
    def result(self) -> Result:
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return Result(self.process.exitcode, read(self.out_file), read(self.err_file))


def kill_at(target: str, *, call: int = 1, after: bool = False) -> Callable[[], None]:
    """A child ``setup`` that SIGKILLs the child at the ``call``-th call of ``module:attribute``.

    Args:
        target: ``"module:attribute"`` or ``"module:Class.method"``.
        call: which call (1 = the first).
        after: kill when that call has returned (its effect is done) rather than when it starts.
    """

    def setup() -> None:
        import importlib

        module_name, _, attr = target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        count = [0]

        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == call and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            value = original(*args, **kwargs)
            if count[0] == call and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return value

        setattr(owner, name, wrapper)

    return setup


def chain(*setups: Callable[[], None] | None) -> Callable[[], None]:
    """Several child ``setup`` functions, in order."""

    def setup() -> None:
        for s in setups:
            if s is not None:
                s()

    return setup


# ---- disk full, in this process ----------------------------------------------------------------------

def no_space(*args: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *args)


def full_disk_on_open(monkeypatch: pytest.MonkeyPatch, *, match: Callable[[str], bool], budget: int = 0) -> None:
    """Files opened for writing whose name ``match``es accept ``budget`` bytes, then raise ENOSPC."""
    real_open = io.open

    class Full(io.RawIOBase):
        def __init__(self, handle):
            self.handle, self.left = handle, budget

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            data = bytes(data)
            if len(data) > self.left:
                self.handle.write(data[: self.left])
                self.handle.flush()
                self.left = 0
                raise no_space()
            self.left -= len(data)
            return self.handle.write(data)

        def close(self) -> None:
            self.handle.close()
            super().close()

        def fileno(self) -> int:
            return self.handle.fileno()

    def patched(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and isinstance(file, (str, os.PathLike)) and match(os.fspath(file)):
            raw = real_open(file, "wb")
            stream = Full(raw)
            return stream if "b" in mode else io.TextIOWrapper(io.BufferedWriter(stream), encoding="utf-8")
        return real_open(file, mode, *args, **kwargs)

    import builtins

    monkeypatch.setattr(io, "open", patched)
    monkeypatch.setattr(builtins, "open", patched)


def json_file(path: Path) -> dict:
    return json.loads(Path(path).read_text())
