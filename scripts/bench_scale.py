"""Scale-out on accelerate (issue 14): 1 process x 2 threads vs 2 processes x 1 thread (gloo), same job, one run.

A third configuration, 1 process x 1 thread, is the baseline of process scaling: the 2-process run does the
same work thread for thread, so its folder must equal that one byte for byte, and 2x1 over 1x1 says how
much a second process adds where one process cannot use the second core.

Jobs, each run as a user would run it, through the CLI:

1. BNS synthesis of --num-images (256) images for the shared CIFAR-10 ResNet-20 (200 steps, batches of 64,
   shards of 64: four shards, two per process). ``hub-dfq synth ...`` with OMP_NUM_THREADS=2, then
   ``hub-dfq synth ... --num-processes 2`` with OMP_NUM_THREADS=1 (accelerate's launcher, gloo).
   Identity: the two folders' shards and preview.png byte for byte, generation.json equal but for timings
   and the device description.
2. Audit of the shared CIFAR-10 test split (10,000 images) against the same model. The reference points are
   measured once beforehand (not timed) and read from the cache by both runs, so the timed runs are the
   streaming audit itself. Identity: every number of the two reports (largest relative difference; batch
   scores and counts exactly).

Wall time is the whole command: start-up (imports, model loading) happens in every process and is included.
The synthesis loop's own time (from generation.json: the slowest process's sum of shard seconds) is
reported too. Speed-up = 1-process wall / 2-process wall; target >= 1.6x for synthesis.

A third mode measures what the multi-GPU estimate in docs/distributed.md needs: the cost of one image
through one BNS step on one device (``--per-image-cost``), and prints the wall time it implies for
--estimate-images images on --gpus GPUs.

Usage (from the repository root, on a quiet 2-core machine: ~10 minutes):

    python scripts/bench_scale.py                         # writes scripts/results/bench_scale.json
    python scripts/bench_scale.py --smoke                 # tiny sizes to check the script; writes no JSON
    python scripts/bench_scale.py --per-image-cost --model timm/resnet50.a1_in1k --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "scripts" / "results"
sys.path.insert(0, str(ROOT))

# 1x1 is the baseline of process scaling: 2x1 runs its kernels, thread for thread, so its bytes are 1x1's
CONFIGS = {"1x1": {"processes": 1, "threads": 1, "label": "1 process x 1 thread"},
           "1x2": {"processes": 1, "threads": 2, "label": "1 process x 2 threads"},
           "2x1": {"processes": 2, "threads": 1, "label": "2 processes x 1 thread (gloo)"}}


def run(argv: list[str], *, threads: int, processes: int, cache: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``hub-dfq ARGV`` (on ``processes`` processes) with ``threads`` threads each; its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HUB_DFQ_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "hub_dfq", *argv] + (["--num-processes", str(processes)] if processes > 1 else [])
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds, done


# ---- identity checks ------------------------------------------------------------------------------

def _timeless(manifest: dict) -> dict:
    manifest = {k: v for k, v in manifest.items() if k not in ("wall_time_s", "device")}
    manifest["shards"] = [{k: v for k, v in s.items() if k != "seconds"} for s in manifest["shards"]]
    return manifest


def compare_folders(a: Path, b: Path) -> dict[str, Any]:
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    data = [f for f in files if f.startswith("data/")] + ["preview.png"]
    same_bytes = files == other and all((a / f).read_bytes() == (b / f).read_bytes() for f in data)
    manifests = [json.loads((folder / "generation.json").read_text()) for folder in (a, b)]
    return {"files": files, "shards_and_preview_identical": same_bytes,
            "manifest_identical_but_timings": _timeless(manifests[0]) == _timeless(manifests[1])}


def _walk(a: Any, b: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out["structure"].append(f"{path}: keys differ")
        for key in a.keys() & b.keys():
            _walk(a[key], b[key], f"{path}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out["structure"].append(f"{path}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float):
        rel = abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0
        if rel > out["max_rel_diff"]:
            out["max_rel_diff"], out["where"] = rel, path
    elif a != b:
        out["structure"].append(f"{path}: {a!r} vs {b!r}")


def compare_reports(a: dict, b: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"max_rel_diff": 0.0, "where": None, "structure": []}
    _walk(a, b, "report", out)
    ca, cb = a["candidates"][0], b["candidates"][0]
    out["batch_scores_identical"] = ca["batch_scores"] == cb["batch_scores"]
    out["counts_identical"] = (ca["n_images"], ca["n_skipped"]) == (cb["n_images"], cb["n_skipped"])
    out["within_1e-9"] = out["max_rel_diff"] <= 1e-9 and not out["structure"]
    return out


# ---- the comparison -------------------------------------------------------------------------------

def _loop_seconds(folder: Path, processes: int) -> float:
    """The slowest process's synthesis time: shards are dealt round robin over the processes."""
    shards = sorted(json.loads((folder / "generation.json").read_text())["shards"], key=lambda s: s["index"])
    return max(sum(s["seconds"] for s in shards[rank::processes]) for rank in range(processes))


def compare(args: argparse.Namespace) -> dict[str, Any]:
    model = f"local-dir:{args.model_dir}"
    results: dict[str, Any] = {"synthesis": {}, "audit": {}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        synth = ["synth", model, "--method", "bns", "--num-images", str(args.num_images), "--iters", str(args.iters),
                 "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--seed", "0",
                 "--no-progress"]
        for name, cfg in CONFIGS.items():
            print(f"synthesis, {cfg['label']} ...", flush=True)
            seconds, _ = run(synth + ["--out", str(work / f"synth-{name}")], threads=cfg["threads"],
                             processes=cfg["processes"], cache=cache)
            results["synthesis"][name] = {"wall_s": seconds,
                                          "loop_s": _loop_seconds(work / f"synth-{name}", cfg["processes"])}
        results["synthesis"]["identity"] = compare_folders(work / "synth-1x2", work / "synth-2x1")
        results["synthesis"]["identity_same_threads"] = compare_folders(work / "synth-1x1", work / "synth-2x1")

        audit = ["audit", model, f"parquet:{args.audit_data}", "--batch-size", "64", "--no-progress"]
        if args.audit_limit:
            audit += ["--limit", str(args.audit_limit)]
        print("audit references (warm-up, not timed) ...", flush=True)
        run(["audit", model, f"parquet:{args.audit_data}", "--limit", "64", "--no-progress",
             "--reference-iters", str(args.iters)], threads=2, processes=1, cache=cache)
        audit += ["--reference-iters", str(args.iters)]
        reports = {}
        for name, cfg in CONFIGS.items():
            print(f"audit, {cfg['label']} ...", flush=True)
            target = work / f"audit-{name}.json"
            seconds, _ = run(audit + ["--json", str(target)], threads=cfg["threads"], processes=cfg["processes"],
                             cache=cache)
            reports[name] = json.loads(target.read_text())
            results["audit"][name] = {"wall_s": seconds, "images": reports[name]["candidates"][0]["n_images"]}
        results["audit"]["identity"] = compare_reports(reports["1x2"], reports["2x1"])
    for job in ("synthesis", "audit"):
        results[job]["speedup"] = results[job]["1x2"]["wall_s"] / results[job]["2x1"]["wall_s"]
        results[job]["process_scaling"] = results[job]["1x1"]["wall_s"] / results[job]["2x1"]["wall_s"]
        results[job]["thread_scaling"] = results[job]["1x1"]["wall_s"] / results[job]["1x2"]["wall_s"]
    synth_loop = results["synthesis"]
    synth_loop["loop_speedup"] = synth_loop["1x2"]["loop_s"] / synth_loop["2x1"]["loop_s"]
    synth_loop["target_speedup"] = 1.6
    synth_loop["target_met"] = synth_loop["speedup"] >= 1.6
    return results


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    s, a = results["synthesis"], results["audit"]
    si, same, ai = s["identity"], s["identity_same_threads"], a["identity"]
    yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
    labels = " | ".join(CONFIGS[name]["label"] for name in CONFIGS)
    walls = lambda job: " | ".join(f"{job[name]['wall_s']:.1f} s" for name in CONFIGS)  # noqa: E731
    lines = [
        f"| job | {labels} | 2x1 over 1x2 | 2x1 over 1x1 | 1x2 over 1x1 | identity |",
        "|---|---|---|---|---|---|---|---|",
        f"| BNS synthesis, {args.num_images} images, {args.iters} steps (wall) | {walls(s)} | {s['speedup']:.2f}x "
        f"(target 1.6x: {'met' if s['target_met'] else 'NOT met'}) | {s['process_scaling']:.2f}x | "
        f"{s['thread_scaling']:.2f}x | 2x1 = 1x1 byte for byte: {yes(same['shards_and_preview_identical'])} "
        f"(generation.json but timings: {yes(same['manifest_identical_but_timings'])}); 2x1 = 1x2: "
        f"{yes(si['shards_and_preview_identical'])} |",
        "| ... synthesis loop only (slowest process) | " + " | ".join(f"{s[n]['loop_s']:.1f} s" for n in CONFIGS)
        + f" | {s['loop_speedup']:.2f}x | | | |",
        f"| audit, {a['1x2']['images']:,} images (wall) | {walls(a)} | {a['speedup']:.2f}x | "
        f"{a['process_scaling']:.2f}x | {a['thread_scaling']:.2f}x | 2x1 vs 1x2: largest relative difference "
        f"{ai['max_rel_diff']:.2g} ({'<= 1e-9' if ai['within_1e-9'] else 'ABOVE 1e-9 or structure differs'}); "
        f"batch scores identical: {yes(ai['batch_scores_identical'])}; counts identical: "
        f"{yes(ai['counts_identical'])} |",
    ]
    return "\n".join(lines)


# ---- per-image-iteration cost (for the multi-GPU estimate) -----------------------------------------

def per_image_cost(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import hub_dfq
    from hub_dfq.synth.config import SynthConfig
    from hub_dfq.synth.generator import BatchGenerator

    torch.set_num_threads(args.threads or torch.get_num_threads())
    name = args.model
    if args.random_weights:
        # why: the cost of a step does not depend on the weights' values, and a machine without the Hub
        # (a GPU node behind a firewall) can still build the architecture from timm's config
        import timm
        from timm.models import save_for_hf

        folder = Path(tempfile.mkdtemp(prefix="hub-dfq-bench-scale-"))
        save_for_hf(timm.create_model(args.model, pretrained=False), folder, safe_serialization=True)
        name = f"local-dir:{folder}"
    model = hub_dfq.load_model(name, device=args.device)
    config = SynthConfig(method="bns", num_images=args.batch_size, iters=args.cost_iters, batch_size=args.batch_size,
                         precision=args.precision)
    generator = BatchGenerator(model, config)
    targets = torch.arange(args.batch_size) % model.num_classes

    def once() -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generator.generate(targets, torch.Generator().manual_seed(0))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up: kernel selection, allocator, caches
    times = [once() for _ in range(args.repeats)]
    cost = statistics.median(times) / (args.batch_size * args.cost_iters)
    shards = math.ceil(args.estimate_images / args.shard_size)
    per_gpu_images = math.ceil(shards / args.gpus) * args.shard_size
    estimate = per_gpu_images * args.estimate_iters * cost
    return {"model": args.model, "random_weights": args.random_weights, "device": str(model.device),
            "precision": config.precision,
            "batch_size": args.batch_size, "iters_timed": args.cost_iters, "repeats": args.repeats,
            "seconds_per_image_iteration": cost, "estimate": {
                "images": args.estimate_images, "iters": args.estimate_iters, "gpus": args.gpus,
                "shard_size": args.shard_size, "images_per_gpu": per_gpu_images, "seconds": estimate,
                "formula": "ceil(ceil(images / shard_size) / gpus) * shard_size * iters * seconds_per_image_iteration "
                           "(+ start-up and the final card/preview, not included)"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script (no JSON unless --json)")
    parser.add_argument("--json", help="where to write the results (default scripts/results/bench_scale.json)")
    parser.add_argument("--model-dir", default=str(SHARED / "models" / "cifar10-resnet20"))
    parser.add_argument("--audit-data", default=str(SHARED / "data" / "cifar10" / "test.parquet"))
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--audit-limit", type=int, help="audit only the first N images (default: the whole split)")
    cost = parser.add_argument_group("--per-image-cost: one device's cost of a BNS image-iteration, and the estimate")
    cost.add_argument("--per-image-cost", action="store_true")
    cost.add_argument("--model", default="timm/resnet50.a1_in1k")
    cost.add_argument("--random-weights", action="store_true",
                      help="build --model (a timm architecture name) from its config, without downloading weights")
    cost.add_argument("--device", default="cuda")
    cost.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    cost.add_argument("--threads", type=int)
    cost.add_argument("--cost-iters", type=int, default=20, help="BNS steps per timed batch")
    cost.add_argument("--repeats", type=int, default=3)
    cost.add_argument("--estimate-images", type=int, default=10_000)
    cost.add_argument("--estimate-iters", type=int, default=200)
    cost.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()

    import torch  # why: only for the environment record; the timed work runs in subprocesses

    environment = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                   "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.per_image_cost:
        result = {"environment": environment, "per_image_cost": per_image_cost(args)}
        c = result["per_image_cost"]
        est = c["estimate"]
        print(f"{c['model']} on {c['device']} ({c['precision']}, batch {c['batch_size']}): "
              f"{c['seconds_per_image_iteration'] * 1e3:.3f} ms per image-iteration")
        print(f"estimate: {est['images']:,} images x {est['iters']} steps on {est['gpus']} devices = "
              f"{est['images_per_gpu']:,} images per device -> {est['seconds'] / 60:.1f} min (+ start-up)")
        path = Path(args.json) if args.json else RESULTS / "bench_scale_per_image_cost.json"
    else:
        if args.smoke:
            args.num_images, args.iters, args.shard_size, args.batch_size = 32, 5, 8, 8
            args.audit_limit = args.audit_limit or 512
        result = {"environment": environment, "settings": {k: v for k, v in vars(args).items()
                                                           if k in ("num_images", "iters", "batch_size", "shard_size",
                                                                    "audit_limit", "model_dir", "audit_data",
                                                                    "smoke")},
                  **compare(args)}
        print()
        print(table(result, args))
        path = Path(args.json) if args.json else (None if args.smoke else RESULTS / "bench_scale.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
