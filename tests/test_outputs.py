"""hub_dfq.outputs and hub_dfq.locks on their own: checks, staged replacement, recovery, the lock."""

from __future__ import annotations

import json
import os

import pytest

from hub_dfq import locks, outputs
from hub_dfq.errors import OutputExistsError, OutputLockedError, OutputWriteError, UnsafeOutputError


def write_result(target, files: dict[str, str], *, overwrite: bool = False, kind: str = "checkpoint"):
    with outputs.reserve_folder(target, kind=kind, overwrite=overwrite) as out:
        with outputs.staged(out) as staging:
            for name, text in files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_text(text)
    return out.path


def test_a_replacement_keeps_every_file_hub_dfq_did_not_write(tmp_path):
    target = write_result(tmp_path / "q", {"model.bin": "v1", "sub/card.md": "v1"})
    assert json.loads((target / ".hub-dfq.json").read_text())["files"] == ["model.bin", "sub/card.md"]
    (target / "notes.txt").write_text("mine")
    (target / "sub" / "mine.txt").write_text("mine too")
    (target / "empty").mkdir()
    (target / "link").symlink_to("notes.txt")
    write_result(target, {"model.bin": "v2"}, overwrite=True)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        ".hub-dfq.json", "empty", "link", "model.bin", "notes.txt", "sub", "sub/mine.txt"]
    assert (target / "model.bin").read_text() == "v2" and os.readlink(target / "link") == "notes.txt"
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no staging folder, no lock file


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_both_swaps_give_the_same_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    target = write_result(tmp_path / "q", {"a": "1"})
    write_result(target, {"b": "2"}, overwrite=True)
    assert sorted(os.listdir(target)) == [".hub-dfq.json", "b"] and sorted(os.listdir(tmp_path)) == ["q"]


def test_a_folder_moved_aside_by_a_killed_swap_comes_back(tmp_path):
    target = write_result(tmp_path / "q", {"a": "old"})
    os.rename(target, tmp_path / ".q.hub-dfq-old-4194311")  # killed between the two renames of the fallback
    staging = tmp_path / ".q.hub-dfq-new-4194311"
    staging.mkdir()
    (staging / ".hub-dfq.json").write_text(outputs._marker_text("checkpoint", [], staging=True))
    with outputs.reserve_folder(target, kind="checkpoint", overwrite=True) as out:
        assert out.holds_result and (target / "a").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_an_error_while_staging_changes_nothing(tmp_path):
    target = write_result(tmp_path / "q", {"a": "old"})
    with pytest.raises(OutputWriteError, match="No space left"):
        with outputs.reserve_folder(target, kind="checkpoint", overwrite=True) as out:
            with outputs.staged(out) as staging:
                (staging / "a").write_text("half")
                raise OSError(28, "No space left on device")
    assert (target / "a").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["q"]


def test_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("x")
    with pytest.raises(UnsafeOutputError, match="the current folder"):
        outputs.check_folder(".", kind="audit")
    with pytest.raises(UnsafeOutputError, match="a parent of the current folder"):
        outputs.check_folder("..", kind="audit", overwrite=True)
    with pytest.raises(OutputExistsError, match="is a file"):
        outputs.check_folder("file", kind="audit")
    with pytest.raises(OutputExistsError, match="did not write"):
        outputs.check_folder("theirs", kind="audit", overwrite=True)
    write_result(tmp_path / "report", {"audit.json": "{}"}, kind="audit")
    with pytest.raises(OutputExistsError, match="holds an audit report, not a quantized checkpoint"):
        outputs.check_folder("report", kind="checkpoint", overwrite=True)
    assert outputs.check_folder("new/deeper", kind="audit").state == "absent"
    with pytest.raises(OutputExistsError, match="is a folder"):
        outputs.check_file("theirs")
    with pytest.raises(OutputExistsError, match="`overwrite=True`"):
        outputs.check_file("file")
    assert outputs.check_file("file", overwrite=True) == tmp_path / "file"


def test_write_file_is_atomic_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputWriteError, match="out.json"):
        outputs.write_file(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    outputs.write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    assert outputs.is_temp(outputs.temp_path(target).name) and not outputs.is_temp(".notes.tmp")


def test_the_lock_is_reentrant_names_its_holder_and_goes_away(tmp_path):
    import fcntl

    target = tmp_path / "d"
    with locks.hold(target) as path:
        with locks.hold(target):
            assert locks.is_held(target)
        assert locks.holder(target)["pid"] == os.getpid() and path.exists()
    assert not path.exists() and not locks.is_held(target)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)  # another process's lock (another open file description)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": 4242, "command": "hub-dfq synth x", "started": 0}).encode())
    try:
        with pytest.raises(OutputLockedError, match=r"pid 4242, started .*: hub-dfq synth x\): wait for it"):
            with locks.hold(target, argument="out_dir"):
                pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    with locks.hold(target):  # a lock file nobody holds (its process died) is taken over
        assert locks.holder(target)["pid"] == os.getpid()
