"""Several processes (gloo, one thread each) give the single-process results: synthesis byte for byte, audits
to float64 rounding, evaluation counts exactly; rank 0 alone writes and pushes; bad launches fail clearly.

The multi-process runs start real processes: `hub-dfq ... --num-processes 2` (accelerate's launcher),
`accelerate launch`, and two processes given their ranks by hand as two machines would be. The single-process
runs they are compared with happen in this process, with one torch thread.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hub_dfq
from hub_dfq.data import RowMap
from hub_dfq.distributed import Distributed
from hub_dfq.outputs import MARKER
from hub_dfq.partition import block_size, rank_part
from hub_dfq.synth.api import generate_folder, synthesize
from hub_dfq.synth.config import SynthConfig
from hub_dfq.synth.records import RECORDS_DIR, write_record

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).with_name("distributed_jobs.py")
sys.path.insert(0, str(JOBS.parent))
import distributed_jobs  # noqa: E402  (the jobs the launched processes run, and their settings)

SYNTH = ["--method", "bns", "--iters", "5", "--batch-size", "8", "--shard-size", "8", "--no-progress"]
LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0"]


def child_env(**extra: str) -> dict[str, str]:
    """This test session's environment (local Hub, caches) for processes that run this checkout, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HUB_DFQ_FS_WAIT": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, **extra}


def hub_dfq_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hub_dfq", *args], env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "data").glob("*.parquet"))}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "generation.json").read_text())


def timeless(info: dict) -> dict:
    """A manifest without what differs between any two runs: timings and the process/thread description."""
    info = {k: v for k, v in info.items() if k not in ("wall_time_s", "device")}
    info["shards"] = [{k: v for k, v in s.items() if k != "seconds"} for s in info["shards"]]
    return info


def assert_same_folder(multi: Path, single: Path) -> None:
    assert shard_bytes(multi) == shard_bytes(single) and shard_bytes(single)
    assert (multi / "preview.png").read_bytes() == (single / "preview.png").read_bytes()
    assert timeless(manifest(multi)) == timeless(manifest(single))
    assert not (multi / RECORDS_DIR).exists()  # merged into generation.json and removed
    assert sorted(p.relative_to(multi).as_posix() for p in multi.rglob("*")) == \
        sorted(p.relative_to(single).as_posix() for p in single.rglob("*"))


# ---- no processes needed ------------------------------------------------------------------------

def _fake(rank: int, world_size: int) -> Distributed:
    view = Distributed()
    view.rank, view.world_size = rank, world_size
    return view


def test_parts_are_whole_blocks_that_cover_every_row_once():
    data = hub_dfq.load_images("default", limit=300)
    rows = []
    for rank in range(3):
        part = rank_part(data, _fake(rank, 3), block=64)
        rows += [part.rows(i) for i in range(part.num_rows)]
        assert part.rows.start % 64 == 0
    assert rows == list(range(300))
    assert rank_part(data, _fake(0, 1), block=64) is data
    assert block_size(32, 64) == 64 and block_size(48, 64) == 192
    assert RowMap(start=64, block=64, stride=192)(70) == 64 + 192 + 6  # a streamed part: every third block


def test_a_record_left_by_another_rank_counts_on_resume(model, tmp_path):
    """A killed multi-process run: rank 0 recorded shard 0 in generation.json, rank 1 shard 1 in its record file."""
    config = SynthConfig(method="gaussian", num_images=24, batch_size=8, shard_size=8)
    generate_folder(model, config, tmp_path / "full", progress=False)
    out = tmp_path / "run"
    generate_folder(model, config, out, progress=False, stop_after_shards=2)
    info = manifest(out)
    shard1 = info["shards"].pop(1)
    (out / "generation.json").write_text(json.dumps(info))
    write_record(out, shard1, fingerprint=info["fingerprint"])
    write_record(out, {**shard1, "index": 2}, fingerprint="another run")  # never merged
    made = []
    generate_folder(model, config, out, resume=True, progress=False, on_shard=made.append)
    assert made == [2]
    assert shard_bytes(out) == shard_bytes(tmp_path / "full") and not (out / RECORDS_DIR).exists()


def test_the_runner_deals_items_round_robin_and_runs_steps_in_one_process():
    from hub_dfq.runner import Runner

    assert [Runner(_fake(rank, 3)).shards(range(8)) for rank in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    one = Runner(_fake(0, 1))
    assert one.every_rank(lambda x: x + 1, 1) == [2] and one.main_only(max, 3, 4) == 4 and one.gather(5) == [5]
    one.check_same("a test", seed=0)  # one process: nothing to compare


def test_errors_cross_processes_as_data_and_keep_their_class():
    import pickle

    from hub_dfq.errors import ERROR_TYPES, ConfigError, DistributedError, DivergedError, ErrorRecord

    record = ErrorRecord.of(DivergedError("the loss became nan"), rank=1)
    assert record == pickle.loads(pickle.dumps(record)) == ErrorRecord.from_dict(record.to_dict())
    assert record.kind == "hub_dfq.errors.DivergedError"
    err = record.to_error()
    assert type(err) is DivergedError and str(err) == "rank 1: the loss became nan"
    assert type(ErrorRecord.of(KeyError("x")).to_error()) is KeyError
    assert set(ERROR_TYPES.values()) >= {ConfigError, DistributedError, ValueError}

    class WeirdError(Exception):
        pass

    class MyConfigError(ConfigError):  # a subclass hub-dfq does not know: its nearest hub-dfq class
        pass

    other = ErrorRecord.of(WeirdError("odd"), rank=2).to_error()
    assert type(other) is DistributedError and "rank 2: odd" in str(other) and "WeirdError" in str(other)
    assert type(ErrorRecord.of(MyConfigError("bad")).to_error()) is ConfigError


def test_one_process_never_starts_accelerate(tmp_path):
    """Without a launch every verb runs as before: no accelerate import, no process group."""
    code = ("import sys, torch, hub_dfq\n"
            "model = hub_dfq.load_model('default')\n"
            "data = hub_dfq.load_images('default', limit=64)\n"
            "hub_dfq.evaluate_accuracy(model, data, progress=False)\n"
            "hub_dfq.audit(model, data, references='none', bootstrap=0, progress=False)\n"
            f"hub_dfq.synthesize(model, 'gaussian', 8, out_dir={str(tmp_path / 'g')!r}, progress=False)\n"
            "print('accelerate' in sys.modules, torch.distributed.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"]


# ---- synthesis on two processes -----------------------------------------------------------------

def test_two_processes_write_the_one_process_folder_and_push_once(model, tmp_path, hub):
    from hub_server import WRITE_TOKEN

    repo_id = hub.new_repo_id("sharded")
    out = tmp_path / "two"
    done = hub_dfq_cli("synth", "default", "--num-images", "40", *SYNTH, "--out", str(out), "--num-processes", "2",
                       "--push-to-hub", repo_id, "--token", WRITE_TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("40 bns images") == 1  # rank 0 reports, once
    info = manifest(out)
    assert info["device"].endswith("x 2 processes")
    synthesize(model, "bns", 40, iters=5, batch_size=8, shard_size=8, out_dir=tmp_path / "one", progress=False)
    assert_same_folder(out, tmp_path / "one")
    assert len(hub.commits(repo_id, "dataset")) == 2  # the Hub's initial commit + rank 0's one
    remote = {k: v for k, v in hub.list_files(repo_id, "dataset").items() if k != ".gitattributes"}
    assert remote == {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                      if p.is_file() and p.name != MARKER}  # the marker of hub-dfq's own files is never uploaded


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The process of ``rank`` among the launcher's descendants (read from their environment)."""
    import psutil  # why: installed with accelerate; only this test looks at other processes

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "hub_dfq" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _recorded(out: Path) -> set[int]:
    """Shards a rank has recorded as finished (in generation.json, or in its own record file)."""
    done = set()
    try:
        done |= {s["index"] for s in manifest(out)["shards"]}
    except (OSError, ValueError):
        pass
    return done | {int(p.stem) for p in (out / RECORDS_DIR).glob("[0-9]*.json")}


def test_killed_rank_then_resume_gives_the_same_bytes(model, tmp_path):
    out = tmp_path / "run"
    args = ["synth", "default", "--num-images", "48", "--method", "bns", "--iters", "30", "--batch-size", "8",
            "--shard-size", "8", "--no-progress", "--out", str(out)]
    launcher = subprocess.Popen([sys.executable, "-m", "hub_dfq", *args, "--num-processes", "2"], env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while time.monotonic() < deadline and launcher.poll() is None:
            victim = victim or _rank_pid(launcher.pid, 1)
            if victim is not None and _recorded(out):
                os.kill(victim, signal.SIGKILL)  # rank 1 dies mid-run; the launcher then stops rank 0
                break
            time.sleep(0.05)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0, "the run finished before a rank could be killed"
    assert not (out / "README.md").exists()
    finished = _recorded(out)
    assert 1 <= len(finished) < 6
    names = [f"train-{i:05d}-of-00006.parquet" for i in sorted(finished)]
    before = {name: (out / "data" / name).stat().st_mtime_ns for name in names}
    from hub_dfq.cli import main

    assert main([*args, "--resume"]) == 0  # any number of processes may finish the run: here, this one
    # nothing a rank had finished before the kill is made again
    assert {name: (out / "data" / name).stat().st_mtime_ns for name in names} == before
    config = SynthConfig(method="bns", num_images=48, iters=30, batch_size=8, shard_size=8)
    generate_folder(model, config, tmp_path / "one", progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "one")
    assert manifest(out)["complete"] and not (out / RECORDS_DIR).exists()


# ---- audits, evaluation, distillation on two processes ------------------------------------------

@pytest.fixture
def cifar_with_broken_rows(cifar_test_parquet, tmp_path) -> Path:
    """600 labelled CIFAR-10 test images, two of them unreadable (rows 70 and 400)."""
    table = pq.read_table(cifar_test_parquet).slice(0, 600)
    cells = table.column("img").to_pylist()
    for row in (70, 400):
        cells[row] = {"bytes": b"not an image", "path": None}
    column = pa.array(cells, type=table.schema.field("img").type)
    table = table.set_column(table.schema.get_field_index("img"), "img", column)
    path = tmp_path / "cifar600.parquet"
    pq.write_table(table, path)
    return path


def _close(a, b, rel=1e-9):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key], rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rel)
    elif isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        assert b == pytest.approx(a, rel=rel, abs=1e-300), (a, b)
    else:
        assert a == b


def _results(out: Path, ranks: int = 2) -> list[dict]:
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(ranks)]
    for r in results:
        assert r["ok"], r.get("traceback")
    # hub-dfq ends the process group before the interpreter tears down: a gloo thread still running then would be
    # joined during finalisation, which aborts a process now and then after all its work was done (exit -6)
    for r in range(ranks):
        threads = json.loads((out / f"rank-{r}.threads.json").read_text())
        if threads is not None:
            assert not [name for name in threads if "gloo" in name], threads
    return results


def test_audit_eval_and_distillation_on_two_processes_equal_one_process(model, cifar_with_broken_rows, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCH, str(JOBS), "measure", str(out),
                           str(cifar_with_broken_rows)], env=child_env(), capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _results(out)
    spec = f"parquet:{cifar_with_broken_rows}"
    one = hub_dfq.audit(model, {"parquet": spec}, **distributed_jobs.AUDIT).to_dict()
    one_streamed = hub_dfq.audit(model, {"streamed": spec}, streaming=True, **distributed_jobs.AUDIT).to_dict()
    for result in ranks:  # every process returns the single-process report
        for key, single in (("audit", one), ("streamed", one_streamed)):
            multi = result[key]
            candidate, expected = multi["candidates"][0], single["candidates"][0]
            assert candidate["n_images"] == 598 and candidate["n_skipped"] == 2
            assert [s["index"] for s in candidate["skipped"]] == [70, 400]
            assert candidate["batch_scores"] == expected["batch_scores"]  # the same score batches, bit for bit
            # (PIL's messages about the unreadable rows name a memory address)
            _close({**expected, "skipped": None}, {**candidate, "skipped": None})
            _close(single["references"], multi["references"])
        assert result["accuracy"] == hub_dfq.evaluate_accuracy(model, hub_dfq.load_images(spec), batch_size=32,
                                                               progress=False)
    assert len(one["candidates"][0]["batch_scores"]) == 9 - 2  # 9 full score batches, 2 with an unreadable row
    assert [r["wrote_report"] for r in ranks] == [True, True]  # one shared folder, written by rank 0
    # distillation: the data-parallel processes end with one model (each computed the loss on its half of every
    # batch: without DDP's gradient average they would drift apart), and the logged loss is the whole batch's
    # (step 0: the same model and batch as in one process). Later steps differ from one process by rounding
    # only, which Adam and the straight-through rounding amplify, so they are not compared.
    assert ranks[0]["distill_state"] == ranks[1]["distill_state"]
    single = hub_dfq.quantize(model, calibration=distributed_jobs.calibration_tensor(), **distributed_jobs.DISTILL)
    assert ranks[0]["distill_loss"] == ranks[1]["distill_loss"]
    assert ranks[0]["distill_loss"] == pytest.approx(single.history["distill_loss"], rel=1e-5)  # step 0


# ---- bad launches -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_launches_fail_clearly_and_idle_ranks_return(model, tmp_path):
    """Two processes started by hand, each as a one-process machine (LOCAL_RANK 0), like two nodes."""
    out, base = tmp_path / "out", tmp_path / "work"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(JOBS), "refusals", str(out), str(base)],
                              env=child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ranks = _results(out)
    for result in ranks:
        kind, message = result["different_arguments"]
        assert kind == "ConfigError" and "`seed` is 1 on rank 1 but 0 on rank 0" in message
        assert "nothing was written" in message
        kind, message = result["unshared_folder"]
        assert kind == "SharedFilesystemError" and "rank(s) 1" in message and "share" in message
        assert "`out_dir`" in message
    # an error raised on one rank reaches the others as data: the same class and message (naming the rank), an
    # unknown exception as DistributedError naming its class; the failing rank raises its own
    assert ranks[0]["main_error"] == ["DivergedError", "the loss became nan on rank 0"]
    assert ranks[1]["main_error"] == ["DivergedError", "rank 0: the loss became nan on rank 0"]
    assert ranks[1]["unknown_error"] == ["JobError", "odd"]
    kind, message = ranks[0]["unknown_error"]
    assert kind == "DistributedError" and message.startswith("rank 1: odd") and "JobError" in message
    assert not (base / "mixed").exists()  # refused before anything was written
    assert not (base / "cwd-0" / "unshared").exists() and not (base / "cwd-1" / "unshared").exists()
    synthesize(model, "gaussian", 8, shard_size=8, out_dir=tmp_path / "one", progress=False)
    assert_same_folder(Path(ranks[0]["idle"]), tmp_path / "one")
    # the CLI: exit code 2 everywhere, the message once (rank 0), the flag named, the folder untouched
    (code0, lines0), (code1, lines1) = ranks[0]["cli"], ranks[1]["cli"]
    assert code0 == code1 == 2 and lines1 == []
    assert len(lines0) == 1 and lines0[0].startswith("hub-dfq synth: error: ")
    assert "holds files hub-dfq did not write (README.md)" in lines0[0] and "--out" in lines0[0]
    assert sorted(p.name for p in (base / "taken").iterdir()) == ["README.md"]
