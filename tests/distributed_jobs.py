"""Jobs that tests/test_distributed.py runs on several processes (``accelerate launch`` or hand-set ranks).

Each process writes what it saw to ``OUT/rank-<rank>.json``; the test compares that with the same job in
one process. Usage: ``python tests/distributed_jobs.py JOB OUT [ARG]`` with JOB one of ``measure``,
``refusals``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

import torch

import hub_dfq
from hub_dfq.distributed import process_group
from hub_dfq.errors import DivergedError
from hub_dfq.runner import Runner

AUDIT = dict(batch_size=32, score_batch=64, bootstrap=50, references="auto", reference_images=16,
             reference_iters=5, cache=False, progress=False)
DISTILL = dict(weights=4, activations=8, algorithm="distill", settings={"distill": {"iters": 12, "batch_size": 16}},
               resume=False, progress=False)


def calibration_tensor() -> torch.Tensor:
    """The same 48 inputs in every process (and in the test's single process)."""
    return torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def state_digest(qmodel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(qmodel.module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def measure(out: Path, parquet: str) -> dict:
    """Audit (in memory and streamed), evaluation and distillation of the embedded model."""
    model = hub_dfq.load_model("default")
    audit_dir = out / "audit"
    report = hub_dfq.audit(model, {"parquet": f"parquet:{parquet}"}, out_dir=audit_dir, **AUDIT)
    streamed = hub_dfq.audit(model, {"streamed": f"parquet:{parquet}"}, streaming=True, **AUDIT)
    accuracy = hub_dfq.evaluate_accuracy(model, hub_dfq.load_images(f"parquet:{parquet}"), batch_size=32,
                                         progress=False)
    qmodel = hub_dfq.quantize(model, calibration=calibration_tensor(), **DISTILL)
    return {"audit": report.to_dict(), "streamed": streamed.to_dict(), "accuracy": accuracy,
            "distill_loss": qmodel.history["distill_loss"], "distill_state": state_digest(qmodel),
            "wrote_report": (audit_dir / "audit.json").is_file()}


class JobError(Exception):
    """An exception hub-dfq does not know."""


def refusals(out: Path, base: str) -> dict:
    """Bad input: different arguments per rank, an output folder only rank 0 sees, more ranks than shards, and
    how the CLI reports an error every rank raises."""
    from hub_dfq.cli import main as cli_main
    from hub_dfq.synth.api import synthesize_folder

    dist = process_group()
    base_dir = Path(base)
    seen: dict = {}

    def fail_on_main() -> None:
        raise DivergedError(f"the loss became nan on rank {dist.rank}")

    def fail_on_rank_1() -> int:
        if dist.rank == 1:
            raise JobError("odd")
        return dist.rank

    runner = Runner()
    for key, step in (("main_error", lambda: runner.main_only(fail_on_main)),
                      ("unknown_error", lambda: runner.every_rank(fail_on_rank_1))):
        try:
            step()
        except Exception as err:  # noqa: BLE001 - what each rank sees is the result
            seen[key] = [type(err).__name__, str(err)]
    model = hub_dfq.load_model("default")
    try:  # rank 1 asks for another seed
        synthesize_folder(model, "gaussian", 8, seed=dist.rank, out_dir=base_dir / "mixed", progress=False)
    except hub_dfq.HubDfqError as err:
        seen["different_arguments"] = [type(err).__name__, str(err)]
    # the same relative path names a different folder in each process (as on machines without a shared disk)
    own = base_dir / f"cwd-{dist.rank}"
    own.mkdir(parents=True, exist_ok=True)
    os.chdir(own)
    try:
        synthesize_folder(model, "gaussian", 8, out_dir="unshared", progress=False)
    except hub_dfq.HubDfqError as err:
        seen["unshared_folder"] = [type(err).__name__, str(err)]
    # one shard for two processes: rank 1 has nothing to do and returns with the others
    folder = synthesize_folder(model, "gaussian", 8, shard_size=8, out_dir=base_dir / "idle", progress=False)
    seen["idle"] = str(folder)
    # the CLI prints an error every process raises once, from rank 0
    taken = base_dir / "taken"
    if dist.is_main:
        taken.mkdir(parents=True, exist_ok=True)
        (taken / "README.md").write_text("someone else's dataset card")
    dist.barrier()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli_main(["synth", "default", "--method", "gaussian", "--num-images", "8", "--out", str(taken),
                         "--no-progress"])
    seen["cli"] = [code, stderr.getvalue().splitlines()]
    return seen


def record_threads_at_exit(path: Path) -> None:
    """Write the names of the native threads still running when the interpreter starts tearing down.

    Registered before the process group exists, this runs after every exit handler hub-dfq registers: a gloo
    thread still alive then is joined during finalisation, which now and then aborts the process.
    """
    tasks = Path("/proc/self/task")

    def record() -> None:
        names = sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else None
        path.write_text(json.dumps(names))

    atexit.register(record)


def main() -> None:
    job, out, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    record_threads_at_exit(out / f"rank-{os.environ.get('RANK', '0')}.threads.json")
    rank = process_group().rank
    try:
        result = {"ok": True, **{"measure": measure, "refusals": refusals}[job](out, arg)}
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails with the traceback
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    (out / f"rank-{rank}.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
