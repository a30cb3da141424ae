"""Fault injection over every command: nothing a user owns is lost, no traceback, no mixed runs (issue #12).

Each case below is one row of the table in docs/reliability.md: an id, what is done, what must come of
it. Every case checks the exit code, that hub-dfq says what went wrong in one line without a traceback,
and a checksum of every file that existed before the command (a project folder with a user's files, a
home folder, the cache, earlier outputs): nothing lost or changed unless the command's job is to
replace it. Killed runs are rerun and must finish with the bytes of an uninterrupted run.

``HUB_DFQ_FAULT_TABLE=docs/reliability.md pytest tests/test_faults.py`` writes the table into the doc.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import datasets
import pytest
from fault_harness import (
    FAULTS,
    OBSERVED,
    Sandbox,
    chain,
    digest,
    fault,
    full_disk_on_open,
    json_file,
    kill_at,
    litter,
    no_space,
    table_markdown,
    tree,
    write_table,
)

import hub_dfq

ROOT = Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL

# Cheap commands: the embedded model, a handful of images, no evaluation.
QUANT = ["quantize", "default", "--weights", "8", "--activations", "8", "--calibration", "default",
         "--calibration-images", "16", "--eval", "none", "--weight-observer", "minmax", "--act-observer", "minmax",
         "--no-progress"]
SYNTH = ["synth", "default", "--method", "gaussian", "--num-images", "8", "--batch-size", "4", "--shard-size", "4",
         "--no-progress"]
BNS = ["synth", "default", "--method", "bns", "--iters", "4", "--num-images", "24", "--batch-size", "8",
       "--shard-size", "8", "--no-progress"]
GAUSSIAN = [*QUANT[:7], "gaussian", *QUANT[8:]]  # calibrated on synthetic noise (a synth cache entry)
AUDIT = ["audit", "default", "default", "--limit", "16", "--references", "none", "--bootstrap", "0", "--no-progress"]
RECONSTRUCT = ["quantize", "default", "--weights", "4", "--activations", "8", "--calibration", "default",
               "--calibration-images", "16", "--eval", "none", "--algorithm", "reconstruct", "--preset", "tiny",
               "--weight-observer", "minmax", "--act-observer", "minmax", "--no-progress"]


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    write_table()


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Outputs hub-dfq wrote earlier (a checkpoint, a dataset, an audit report), copied into sandboxes."""
    from hub_dfq.cli import main

    root = tmp_path_factory.mktemp("templates")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(QUANT + ["--out", "checkpoint"]) == 0
        assert main(SYNTH + ["--out", "dataset"]) == 0
        assert main(AUDIT + ["--out", "audit"]) == 0
    finally:
        os.chdir(cwd)
    return {"checkpoint": root / "checkpoint", "dataset": root / "dataset", "audit": root / "audit"}


@pytest.fixture
def sandbox(tmp_path, monkeypatch, templates, hub_server):
    box = Sandbox(tmp_path / "sandbox", monkeypatch)
    box.templates = templates
    box.hub = hub_server
    try:
        yield box
    finally:
        box.teardown()


def pytest_generate_tests(metafunc):
    """One test per row of the table (the cases are defined below the tests that run them)."""
    if "case" in metafunc.fixturenames:
        slow = metafunc.function.__name__ == "test_slow_fault"
        cases = [f for f in FAULTS if f.slow == slow]
        metafunc.parametrize("case", cases, ids=[f.id for f in cases])


def test_fault(case, sandbox):
    OBSERVED[case.id] = "FAILED"
    case.run(sandbox)
    OBSERVED[case.id] = (sandbox.observed or "ok") + "; nothing lost, no traceback"


@pytest.mark.slow
def test_slow_fault(case, sandbox):
    test_fault(case, sandbox)


def test_the_suite_covers_at_least_40_distinct_faults():
    assert len({f.id for f in FAULTS}) == len(FAULTS) >= 40


def test_docs_list_exactly_the_faults_of_this_suite():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M)
    assert sorted(listed) == sorted(f.id for f in FAULTS), "regenerate the table: see docs/reliability.md"
    assert len(listed) == len(set(listed))


# ---- helpers ---------------------------------------------------------------------------------------

def ours(s: Sandbox, kind: str, rel: str, *, user_file: bool = False) -> Path:
    """Copy an output hub-dfq wrote into the project (optionally with a file of the user's inside)."""
    target = s.path(rel)
    shutil.copytree(s.templates[kind], target)
    if user_file:
        (target / "my-notes.txt").write_text("the user's, not hub-dfq's\n")
    return target


def no_work(s: Sandbox) -> None:
    """Fail the case if the model is even loaded: outputs are checked before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    s.mp.setattr("hub_dfq.models.loader.load_model", refuse)


def never_replace(s: Sandbox) -> None:
    """A safety net for the dangerous-path cases: replacing or discarding any folder fails the case."""

    def refuse(*args, **kwargs):
        raise AssertionError("hub-dfq tried to replace a folder it must refuse")

    s.mp.setattr("hub_dfq.outputs._swap_in", refuse)
    s.mp.setattr("hub_dfq.outputs._discard_old", refuse)


def files(folder: Path) -> dict[str, str]:
    """Checksums of a folder's files, hub-dfq's marker left out."""
    return {p: d for p, d in tree(folder).items() if d != "dir" and p != ".hub-dfq.json"}


def dataset_bytes(folder: Path) -> dict[str, str]:
    """What a rerun must reproduce byte for byte: the shards and the preview (the manifest holds timings)."""
    return {p: d for p, d in files(folder).items() if p.startswith("data/") or p == "preview.png"}


def labelled_parquet(path: Path, labels: list[int]) -> Path:
    rows = hub_dfq.load_images("default", limit=len(labels)).dataset
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"img": rows["img"], "label": labels}, features=features).to_parquet(path)
    return path


def wait_for(path: Path, target: str):
    """(A child ``setup``) ``module:attribute`` waits until ``path`` exists: the run is held mid-way, for as long as
    the test needs, whatever the machine's speed."""

    def setup() -> None:
        import importlib

        module_name, _, name = target.partition(":")
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def waiting(*args, **kwargs):
            deadline = time.monotonic() + 120
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return original(*args, **kwargs)

        setattr(module, name, waiting)

    return setup


def tiny_preset() -> None:
    """(In a child) a preset with a few reconstruction steps, so a killed run is seconds, not minutes."""
    from hub_dfq.quant.registry import Preset, register_preset

    register_preset(Preset("tiny", summary="test preset", calibration_images=16,
                           algorithms={"reconstruct": {"iters": 4, "batch_size": 8}}), overwrite=True)


REFERENCES: dict[tuple, dict[str, str]] = {}


def reference(s: Sandbox, argv: list[str], out: str, setup=None) -> dict[str, str]:
    """Checksums of what an uninterrupted run of ``argv`` (writing ``out``) writes, in a fresh folder and cache."""
    key = (tuple(argv), out)
    if key not in REFERENCES:
        folder = s.root.parent / f"reference-{len(REFERENCES)}"
        folder.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            mp.setenv("HUB_DFQ_CACHE", str(folder / "cache"))
            child = s.fork(*argv, setup=setup)
        assert child.result.code == 0, child.result.err[-2000:]
        REFERENCES[key] = {**dataset_bytes(folder / out), **{k: v for k, v in files(folder / out).items()
                                                             if k == "model.safetensors"}}
    return REFERENCES[key]


def killed(s: Sandbox, child, before: dict[str, str] | None = None) -> None:
    """The child died of SIGKILL (not of an error first); with ``before``, nothing that existed was lost."""
    assert child.result.code == KILLED, f"expected SIGKILL, got {child.result.code}: {child.result.err[-2000:]}"
    s.check(child.result, code=KILLED, before=before, allow_litter=True)


# ==== 1. data loss: where --out points, and what --overwrite may replace ============================

@fault("quantize-out-cwd-overwrite", area="data loss",
       what="`quantize default ... --out . --overwrite` inside a project folder (the report of #12)",
       expected="exit 2 'is the current folder' before any work; every project file intact")
def _(s):
    no_work(s)
    never_replace(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", ".", "--overwrite"), code=2, message="is the current folder", before=before)


@fault("quantize-out-parent-overwrite", area="data loss", what="`quantize ... --out .. --overwrite`",
       expected="exit 2 'a parent of the current folder'; nothing touched")
def _(s):
    no_work(s)
    never_replace(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "..", "--overwrite"), code=2, message="a parent of the current folder",
            before=before)


@fault("quantize-out-home-overwrite", area="data loss", what="`quantize ... --out ~ --overwrite`",
       expected="exit 2 'your home folder'; nothing touched")
def _(s):
    no_work(s)
    never_replace(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", str(s.home), "--overwrite"), code=2, message="your home folder", before=before)


@fault("quantize-out-root-overwrite", area="data loss", what="`quantize ... --out / --overwrite`",
       expected="exit 2 'a filesystem root'; nothing touched")
def _(s):
    no_work(s)
    never_replace(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "/", "--overwrite"), code=2, message="a filesystem root", before=before)


@fault("synth-out-cwd-overwrite", area="data loss", what="`synth ... --out . --overwrite` in a project folder",
       expected="exit 2 'is the current folder'; nothing touched")
def _(s):
    no_work(s)
    never_replace(s)
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", ".", "--overwrite"), code=2, message="is the current folder", before=before)


@fault("audit-out-cwd-overwrite", area="data loss", what="`audit ... --out . --overwrite` in a project folder",
       expected="exit 2 'is the current folder'; nothing touched")
def _(s):
    no_work(s)
    never_replace(s)
    before = s.snapshot()
    s.check(s.cli(*AUDIT, "--out", ".", "--overwrite"), code=2, message="is the current folder", before=before)


@fault("out-symlink", area="data loss", what="`synth --out LINK` where LINK is a symbolic link to a user's folder",
       expected="exit 2 'is a symbolic link'; the link and its target intact")
def _(s):
    (s.path("link")).symlink_to(s.path("src"))
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "link", "--overwrite"), code=2, message="is a symbolic link", before=before)


@fault("quantize-out-foreign-overwrite", area="data loss",
       what="`quantize --out src --overwrite` where src holds the user's code (no hub-dfq marker)",
       expected="exit 2 'holds files hub-dfq did not write' before any work; src intact")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "src", "--overwrite"), code=2, message="holds files hub-dfq did not write",
            before=before)


@fault("synth-out-foreign-overwrite", area="data loss", what="`synth --out src --overwrite` into the user's code",
       expected="exit 2 'holds files hub-dfq did not write'; src intact")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "src", "--overwrite"), code=2, message="holds files hub-dfq did not write",
            before=before)


@fault("audit-out-foreign-overwrite", area="data loss", what="`audit --out src --overwrite` into the user's code",
       expected="exit 2 'holds files hub-dfq did not write'; src intact")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*AUDIT, "--out", "src", "--overwrite"), code=2, message="holds files hub-dfq did not write",
            before=before)


@fault("quantize-out-ours-no-overwrite", area="data loss",
       what="`quantize --out q` where q holds a checkpoint hub-dfq saved, without --overwrite",
       expected="exit 2 'pass --overwrite' before any work; q intact")
def _(s):
    ours(s, "checkpoint", "q")
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "q"), code=2, message="pass --overwrite", before=before)


@fault("quantize-overwrite-keeps-user-files", area="data loss",
       what="`quantize --out q --overwrite` where q holds hub-dfq's checkpoint plus a file of the user's",
       expected="exit 0; the new checkpoint replaces hub-dfq's files, the user's file is kept byte for byte")
def _(s):
    q = ours(s, "checkpoint", "q", user_file=True)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--weights", "6", "--out", "q", "--overwrite"), code=0, before=before,
            changed=("q/model.safetensors", "q/config.json", "q/README.md", "q/.hub-dfq.json"))
    assert json_file(q / "config.json")["quantization_config"]["weights"] == 6


@fault("synth-overwrite-keeps-user-files", area="data loss",
       what="`synth --out d --overwrite --seed 5` where d holds hub-dfq's dataset plus a file of the user's",
       expected="exit 0; the new dataset replaces the old one whole, the user's file is kept")
def _(s):
    d = ours(s, "dataset", "d", user_file=True)
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--seed", "5", "--out", "d", "--overwrite"), code=0, before=before,
            changed=("d/data", "d/generation.json", "d/README.md", "d/preview.png", "d/.hub-dfq.json"))
    assert json_file(d / "generation.json")["arguments"]["seed"] == 5


@fault("audit-overwrite-keeps-user-files", area="data loss",
       what="`audit --out a --overwrite` where a holds hub-dfq's report plus a file of the user's",
       expected="exit 0; the report is replaced, the user's file is kept")
def _(s):
    ours(s, "audit", "a", user_file=True)
    before = s.snapshot()
    s.check(s.cli(*AUDIT, "--out", "a", "--overwrite"), code=0, before=before,
            changed=("a/audit.json", "a/audit.md", "a/audit_layers.png", "a/.hub-dfq.json"))


@fault("overwrite-user-file-name-collision", area="data loss",
       what="`quantize --out q --overwrite --onnx` where the user put their own model.onnx into hub-dfq's q",
       expected="exit 2 'was not written by hub-dfq'; q (and the user's model.onnx) intact, nothing staged left")
def _(s):
    q = ours(s, "checkpoint", "q")
    (q / "model.onnx").write_bytes(b"the user's own export")
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "q", "--overwrite", "--onnx"), code=2, message="was not written by hub-dfq",
            before=before)


@fault("overwrite-without-renameat2", area="data loss",
       what="`quantize --out q --overwrite` where the atomic exchange is unavailable (other OS or file system)",
       expected="exit 0 through the two-rename fallback; the user's file kept, nothing left beside q")
def _(s):
    ours(s, "checkpoint", "q", user_file=True)
    s.mp.setattr("hub_dfq.outputs._exchange", lambda a, b: False)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--weights", "5", "--out", "q", "--overwrite"), code=0, before=before,
            changed=("q/model.safetensors", "q/config.json", "q/README.md", "q/.hub-dfq.json"))


@fault("save-pretrained-crash-mid-write", area="data loss",
       what="`save_pretrained(q, DIR, overwrite=True)` raising an unexpected error after the weights are staged",
       expected="exit 1 (internal error, one line); DIR intact, the staging folder removed")
def _(s):
    ours(s, "checkpoint", "q")
    qmodel = hub_dfq.from_pretrained(str(s.path("q")))

    def boom(*args, **kwargs):
        raise RuntimeError("an unexpected failure while writing the card")

    s.mp.setattr("hub_dfq.hub.checkpoint.render_model_card", boom)
    before = s.snapshot()
    s.check(s.api(lambda: hub_dfq.save_pretrained(qmodel, s.path("q"), overwrite=True)), code=1,
            message="unexpected failure", before=before)


# ==== 2. concurrent runs ===========================================================================

@fault("synth-two-runs-same-out", area="concurrency",
       what="two `synth --out d` runs (seeds 3 and 5) started together",
       expected="the second exits 2 naming the first's pid; d holds the first run only, complete")
def _(s):
    go = s.root.parent / "go"
    first = s.fork(*BNS, "--seed", "3", "--out", "d", wait=False, setup=wait_for(go, "hub_dfq.synth.api:write_shard"))
    lock = s.path(".d.hub-dfq.lock")
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = s.fork(*BNS, "--seed", "5", "--out", "d")  # while the first is still writing d
    go.touch()
    first.wait()
    s.check(first.result, code=0)
    s.check(second.result, code=2, message=f"pid {first.pid}")
    manifest = json_file(s.path("d/generation.json"))
    assert manifest["complete"] and manifest["arguments"]["seed"] == 3


@fault("lock-held-synth-out", area="concurrency", what="`synth --out d` while another process holds d's lock",
       expected="exit 2 'is being written by another hub-dfq process (pid N, ...)'; nothing written")
def _(s):
    s.hold_lock(s.path("d"), "hub-dfq synth default --out d")
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "d"), code=2, message=f"(pid {os.getpid()}", before=before)
    assert not s.path("d").exists()


@fault("lock-held-quantize-out", area="concurrency", what="`quantize --out q` while another process writes q",
       expected="exit 2 naming the other process, before any work")
def _(s):
    s.hold_lock(s.path("q"), "hub-dfq quantize default --out q")
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "q"), code=2, message="hub-dfq quantize default --out q", before=before)


@fault("lock-held-audit-out", area="concurrency", what="`audit --out a` while another process writes a",
       expected="exit 2 naming the other process")
def _(s):
    s.hold_lock(s.path("a"), "hub-dfq audit default --out a")
    before = s.snapshot()
    s.check(s.cli(*AUDIT, "--out", "a"), code=2, message="is being written by another hub-dfq process",
            before=before)


@fault("lock-held-onnx-file", area="concurrency", what="`export q --out m.onnx` while another process writes m.onnx",
       expected="exit 2 naming the other process")
def _(s):
    ours(s, "checkpoint", "q")
    s.hold_lock(s.path("m.onnx"), "hub-dfq export q --out m.onnx")
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "m.onnx"), code=2, message="is being written by another", before=before)


@fault("lock-held-synth-cache-entry", area="concurrency",
       what="`quantize --calibration gaussian` while another process generates the same synthetic cache entry",
       expected="exit 2 'synthetic-data cache entry ... is being written by another hub-dfq process'")
def _(s):
    argv = GAUSSIAN
    s.check(s.cli(*argv), code=0)
    entry = next(p for p in (s.cache / "synth").iterdir() if p.is_dir())
    s.hold_lock(entry, "hub-dfq synth (the same cache entry)")
    before = s.snapshot()
    s.check(s.cli(*argv), code=2, message="synthetic-data cache entry", before=before)


@fault("lock-held-resume-state", area="concurrency",
       what="`quantize --algorithm reconstruct` while another process runs the same quantization (its resume state)",
       expected="exit 2 'saved progress of this quantization run ... is being written'")
def _(s):
    child = s.fork(*RECONSTRUCT, "--out", "q", setup=chain(tiny_preset, kill_at("hub_dfq.quant.reconstruct:_fit_block",
                                                                                  call=3)))
    killed(s, child)
    state = next(p for p in (s.cache / "quantize").iterdir() if p.is_dir())
    s.hold_lock(state, "hub-dfq quantize default --algorithm reconstruct")
    before = s.snapshot()
    s.check(s.fork(*RECONSTRUCT, "--out", "q", setup=tiny_preset).result, code=2,
            message="saved progress of this quantization run", before=before, allow_litter=True)


@fault("lock-held-audit-reference", area="concurrency",
       what="`audit --references gaussian` while another process measures the same reference point",
       expected="exit 2 'audit reference cache entry ... is being written'")
def _(s):
    argv = [a if a != "none" else "gaussian" for a in AUDIT]
    s.check(s.cli(*argv), code=0)
    entry = next((s.cache / "audit").glob("*.json"))
    s.hold_lock(entry, "hub-dfq audit default")
    before = s.snapshot()
    s.check(s.cli(*argv), code=2, message="audit reference cache entry", before=before)


@fault("lock-stale-from-dead-process", area="concurrency",
       what="`synth --out d` where a lock file names a process that died (kernel lock released)",
       expected="exit 0: the stale lock is taken over and removed")
def _(s):
    s.path(".d.hub-dfq.lock").write_text(json.dumps({"pid": 2**22 + 7, "command": "hub-dfq synth", "started": 0}))
    s.check(s.cli(*SYNTH, "--out", "d"), code=0)
    assert not s.path(".d.hub-dfq.lock").exists()


@fault("cache-clear-skips-locked-entry", area="concurrency",
       what="`hub-dfq cache clear` while another process writes one of the entries",
       expected="exit 0; the entry in use is kept (a warning), the others are removed")
def _(s):
    s.check(s.cli(*GAUSSIAN), code=0)
    s.check(s.cli(*[a if a != "none" else "gaussian" for a in AUDIT]), code=0)  # an audit reference entry
    entry = next(p for p in (s.cache / "synth").iterdir() if p.is_dir())
    s.hold_lock(entry, "hub-dfq quantize default --calibration gaussian")
    kept = tree(entry)
    s.check(s.cli("cache", "clear"), code=0)
    assert tree(entry) == kept and not list((s.cache / "audit").glob("*.json"))


@fault("stale-temporaries-cleaned", area="concurrency",
       what="`synth --out d --resume` where a killed run left a per-process temporary and the user a `.x.tmp`",
       expected="exit 0; hub-dfq's temporary removed, the user's `.x.tmp` kept")
def _(s):
    first = s.fork(*BNS, "--out", "d", setup=kill_at("hub_dfq.synth.api:write_shard", call=2))
    killed(s, first)
    (s.path("d/data/.train-00001-of-00003.parquet.4194311.hub-dfq.tmp")).write_bytes(b"half a shard")
    (s.path("d/data/.x.tmp")).write_text("the user's")
    before = s.snapshot()
    s.check(s.cli(*BNS, "--out", "d", "--resume"), code=0, before=before, changed=("d/generation.json",))
    assert s.path("d/data/.x.tmp").read_text() == "the user's"


# ==== 3. input that used to end in a traceback =======================================================

def _weights_case(damage):
    def run(s):
        from hub_dfq.models.loader import default_model_dir

        shutil.copytree(default_model_dir(), s.path("m"))
        damage(s.path("m/model.safetensors"))
        before = s.snapshot()
        s.check(s.cli("info", "local-dir:m"), code=2, message="weights", before=before)
    return run


def _rekey(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({"x." + k: v for k, v in load_file(path).items()}, path)


def _reshape(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["conv1.weight"] = torch.zeros(3, 3)
    save_file(tensors, path)


fault("weights-truncated", area="traceback", what="`info local-dir:m` with m/model.safetensors cut to 5,000 bytes",
      expected="exit 2 'corrupted or truncated'")(_weights_case(lambda p: p.write_bytes(p.read_bytes()[:5000])))
fault("weights-garbage", area="traceback", what="`info local-dir:m` with garbage bytes as model.safetensors",
      expected="exit 2 'corrupted or truncated'")(_weights_case(lambda p: p.write_bytes(b"garbage" * 64)))
fault("weights-wrong-keys", area="traceback", what="`info local-dir:m` with every weight under another name",
      expected="exit 2 'do not fit the architecture'")(_weights_case(_rekey))
fault("weights-wrong-shape", area="traceback", what="`info local-dir:m` with conv1.weight of the wrong shape",
      expected="exit 2 'do not fit the architecture'")(_weights_case(_reshape))


@fault("dataset-zero-rows", area="traceback", what="`eval default --dataset empty.parquet` (a parquet with no rows)",
       expected="exit 2 'is empty'")
def _(s):
    hub_dfq.load_images("default").dataset.select(range(0)).to_parquet(s.path("empty.parquet"))
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--dataset", "empty.parquet"), code=2, message="is empty", before=before)


@fault("dataset-not-parquet", area="traceback", what="`eval default --dataset x.parquet` where x.parquet is text",
       expected="exit 2 'is not a readable parquet file'")
def _(s):
    s.path("x.parquet").write_text("not parquet at all\n" * 20)
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--dataset", "x.parquet"), code=2, message="is not a readable parquet file",
            before=before)


@fault("dataset-empty-folder", area="traceback", what="`eval default --dataset empty/` (an empty folder)",
       expected="exit 2 'holds no data files'")
def _(s):
    s.path("empty").mkdir()
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--dataset", "empty"), code=2, message="holds no data files", before=before)


@fault("dataset-other-file", area="traceback", what="`eval default --dataset notes.txt` (a local file, not parquet)",
       expected="exit 2 'is a file but not a .parquet file', without a Hub look-up")
def _(s):
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--dataset", "notes.txt"), code=2, message="is a file but not a .parquet file",
            before=before)


@fault("synth-out-is-file", area="traceback", what="`synth --out notes.txt` (a regular file)",
       expected="exit 2 'is a file'; notes.txt intact")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "notes.txt"), code=2, message="is a file", before=before)


@fault("quantize-out-is-file", area="traceback", what="`quantize --out notes.txt --overwrite`",
       expected="exit 2 'is a file' before any work; notes.txt intact")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "notes.txt", "--overwrite"), code=2, message="is a file", before=before)


@fault("out-under-a-file", area="traceback", what="`synth --out notes.txt/d` (a folder under a regular file)",
       expected="exit 2 'is a file, so nothing can be created under it'")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "notes.txt/d"), code=2, message="nothing can be created under it", before=before)


@fault("synth-out-read-only", area="traceback", what="`synth --out ro` where ro is a read-only folder",
       expected="exit 2 'cannot write in'")
def _(s):
    s.read_only(s.path("ro"))
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "ro"), code=2, message="cannot write in", before=before)


@fault("quantize-out-read-only", area="traceback", what="`quantize --out ro/q` under a read-only folder",
       expected="exit 2 'cannot write in' before any work")
def _(s):
    s.read_only(s.path("ro"))
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "ro/q"), code=2, message="cannot write in", before=before)


@fault("export-out-read-only", area="traceback", what="`export q --out ro/m.onnx` under a read-only folder",
       expected="exit 2 'cannot write in' before the checkpoint is read")
def _(s):
    ours(s, "checkpoint", "q")
    s.read_only(s.path("ro"))
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "ro/m.onnx"), code=2, message="cannot write in", before=before)


@fault("export-out-is-folder", area="traceback", what="`export q --out src` (a folder)",
       expected="exit 2 'is a folder'")
def _(s):
    ours(s, "checkpoint", "q")
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "src"), code=2, message="is a folder", before=before)


@fault("json-is-folder", area="traceback", what="`eval default --json src` (a folder)",
       expected="exit 2 'is a folder' before any work; no src.tmp left")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--limit", "8", "--json", "src"), code=2, message="is a folder", before=before)
    assert not list(s.project.glob("*.tmp"))


@fault("json-read-only", area="traceback", what="`info default --json ro/info.json` under a read-only folder",
       expected="exit 2 'cannot write in' before any work")
def _(s):
    s.read_only(s.path("ro"))
    no_work(s)
    before = s.snapshot()
    s.check(s.cli("info", "default", "--json", "ro/info.json"), code=2, message="cannot write in", before=before)


@fault("checkpoint-format-version-abc", area="traceback",
       what="`info q` where q/config.json says `format_version: \"abc\"`",
       expected="exit 2 'which is not a number'")
def _(s):
    q = ours(s, "checkpoint", "q")
    config = json_file(q / "config.json")
    config["quantization_config"]["format_version"] = "abc"
    (q / "config.json").write_text(json.dumps(config))
    before = s.snapshot()
    s.check(s.cli("info", "q"), code=2, message="which is not a number", before=before)


@fault("save-pretrained-float-model", area="traceback", what="`hub_dfq.save_pretrained(load_model('default'), DIR)`",
       expected="ArgumentTypeError (a TypeError) 'takes a QuantizedModel'; DIR not created")
def _(s):
    model = hub_dfq.load_model("default")
    before = s.snapshot()
    s.check(s.api(lambda: hub_dfq.save_pretrained(model, s.path("q")), builtin=TypeError), code=2,
            message="takes a QuantizedModel", before=before)
    assert not s.path("q").exists()


@fault("load-model-int", area="traceback", what="`hub_dfq.load_model(123)`",
       expected="ModelSpecError (a ValueError) 'must be a string or a path'")
def _(s):
    s.check(s.api(lambda: hub_dfq.load_model(123), builtin=ValueError), code=2, message="must be a string or a path")


@fault("load-images-none", area="traceback", what="`hub_dfq.load_images(None)`",
       expected="DatasetError (a ValueError) 'must be a string, a path or a datasets object'")
def _(s):
    s.check(s.api(lambda: hub_dfq.load_images(None), builtin=ValueError), code=2,
            message="must be a string, a path or a datasets object")


# ==== 4. work thrown away ==========================================================================

@fault("quantize-unwritable-out-before-work", area="work thrown away",
       what="`quantize --algorithm reconstruct --out ro/q` with ro read-only",
       expected="exit 2 before the model is loaded (no minutes of reconstruction lost)")
def _(s):
    s.read_only(s.path("ro"))
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--algorithm", "reconstruct", "--out", "ro/q"), code=2, message="cannot write in",
            before=before)


@fault("quantize-bad-json-before-work", area="work thrown away", what="`quantize --json src` (a folder)",
       expected="exit 2 before the model is loaded")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--json", "src"), code=2, message="is a folder", before=before)


@fault("audit-bad-out-before-work", area="work thrown away", what="`audit --out src` (the user's code)",
       expected="exit 2 before the model is loaded")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*AUDIT, "--out", "src"), code=2, message="holds files hub-dfq did not write", before=before)


# ==== 5. silently accepted ============================================================================

@fault("eval-label-99", area="silent acceptance", what="`eval default --dataset p.parquet` whose labels are 99",
       expected="exit 2 'has label 99, but the model has 10 classes'")
def _(s):
    labelled_parquet(s.path("p.parquet"), [3, 99, 1, 2])
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--dataset", "p.parquet"), code=2, message="has label 99, but the model has 10",
            before=before)


@fault("eval-label-negative", area="silent acceptance", what="`eval` on a parquet whose labels include -5",
       expected="exit 2 'has label -5'")
def _(s):
    labelled_parquet(s.path("p.parquet"), [3, 1, -5, 2])
    before = s.snapshot()
    s.check(s.cli("eval", "default", "--dataset", "p.parquet"), code=2, message="has label -5", before=before)


@fault("synth-iters-0", area="silent acceptance", what="`synth --method bns --iters 0`",
       expected="exit 2 '--iters: must be a positive whole number' (when the command line is read); nothing written")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*BNS, "--iters", "0", "--out", "d"), code=2, message="--iters: must be a positive whole number",
            before=before)
    assert not s.path("d").exists()


@fault("quantize-reconstruct-iters-0", area="silent acceptance",
       what="`quantize(model, algorithm='reconstruct', settings={'reconstruct': {'iters': 0}})`",
       expected="ConfigError (a ValueError) 'needs `iters` > 0'")
def _(s):
    s.check(s.api(lambda: hub_dfq.quantize("default", algorithm="reconstruct", calibration="default",
                                           settings={"reconstruct": {"iters": 0}}), builtin=ValueError),
            code=2, message="needs `iters` > 0")


@fault("synth-out-unrelated-files", area="silent acceptance",
       what="`synth --out src` (a folder of unrelated files, no --overwrite)",
       expected="exit 2 'holds files hub-dfq did not write'; nothing written beside them")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "src"), code=2, message="holds files hub-dfq did not write", before=before)


@fault("export-onnx-existing-file", area="silent acceptance", what="`hub_dfq.export_onnx(q, 'notes.txt')`",
       expected="OutputExistsError (a FileExistsError) 'pass `overwrite=True`'; notes.txt intact")
def _(s):
    ours(s, "checkpoint", "q")
    qmodel = hub_dfq.from_pretrained(str(s.path("q")))
    before = s.snapshot()
    s.check(s.api(lambda: hub_dfq.export_onnx(qmodel, s.path("notes.txt")), builtin=FileExistsError), code=2,
            message="pass `overwrite=True`", before=before)


@fault("audit-all-unreadable", area="silent acceptance",
       what="`audit default junk.parquet` and `eval` where every image is unreadable",
       expected="both exit 2 'none of its 3 images could be read' / 'no readable images'")
def _(s):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"img": [{"bytes": b"junk", "path": None}] * 3, "label": [0, 1, 2]},
                               features=features).to_parquet(s.path("junk.parquet"))
    before = s.snapshot()
    s.check(s.cli("audit", "default", "junk.parquet", "--references", "none", "--bootstrap", "0"), code=2,
            message="none of its 3 images could be read", before=before)
    s.check(s.cli("eval", "default", "--dataset", "junk.parquet"), code=2, message="no readable images",
            before=before)


# ==== 6. misleading messages ==========================================================================

@fault("calibration-size-0", area="message", what="`quantize --calibration default --calibration-size 0`",
       expected="exit 2 naming --calibration-images (not --limit) before any work")
def _(s):
    no_work(s)
    s.check(s.cli(*QUANT, "--calibration-size", "0"), code=2,
            message="--calibration-images must be a positive number of calibration images")


@fault("eval-limit-0", area="message", what="`quantize --eval default --eval-limit 0`",
       expected="exit 2 naming --eval-limit before any work")
def _(s):
    no_work(s)
    s.check(s.cli(*QUANT, "--eval", "default", "--eval-limit", "0"), code=2, message="--eval-limit must be")


# ==== disk full ======================================================================================

@fault("disk-full-synth-shard", area="disk full",
       what="`synth --out d` where writing the second shard fails with ENOSPC half-way, then `--resume`",
       expected="exit 2 'No space left on device ... continue with --resume'; no partial shard; the rerun "
                "finishes with the bytes of an uninterrupted run")
def _(s):
    import pyarrow.parquet as pq

    real, calls = pq.write_table, [0]

    def half_then_full(table, where, **kwargs):
        calls[0] += 1
        real(table, where, **kwargs)
        if calls[0] == 2:
            data = Path(where).read_bytes()
            Path(where).write_bytes(data[: len(data) // 2])
            raise no_space(str(where))

    s.mp.setattr(pq, "write_table", half_then_full)
    before = s.snapshot()
    s.check(s.cli(*SYNTH, "--out", "d"), code=2, message="No space left on device", before=before)
    assert "--resume" in s.last_error and len(list(s.path("d/data").glob("*.parquet"))) == 1
    s.mp.setattr(pq, "write_table", real)
    s.check(s.cli(*SYNTH, "--out", "d", "--resume"), code=0)
    assert files(s.path("d/data")) == files(s.templates["dataset"] / "data")


@fault("disk-full-checkpoint-overwrite", area="disk full",
       what="`quantize --out q --overwrite` where the disk fills while model.safetensors is written",
       expected="exit 2 'No space left on device'; the old checkpoint intact, nothing staged left")
def _(s):
    ours(s, "checkpoint", "q", user_file=True)
    full_disk_on_open(s.mp, match=lambda name: name.endswith("model.safetensors"), budget=4096)
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--weights", "6", "--out", "q", "--overwrite"), code=2, message="No space left on device",
            before=before)


@fault("disk-full-audit-report", area="disk full",
       what="`audit --out a --overwrite` where the disk fills while audit.md is written",
       expected="exit 2 'No space left on device'; the old report intact")
def _(s):
    ours(s, "audit", "a")
    full_disk_on_open(s.mp, match=lambda name: name.endswith("audit.md"), budget=100)
    before = s.snapshot()
    s.check(s.cli(*AUDIT, "--out", "a", "--overwrite"), code=2, message="No space left on device", before=before)


@fault("disk-full-json", area="disk full",
       what="`info default --json r.json --overwrite` (r.json exists) with the disk full",
       expected="exit 2 'No space left on device'; the old r.json intact, no temporary left")
def _(s):
    s.path("r.json").write_text('{"old": true}\n')
    full_disk_on_open(s.mp, match=lambda name: name.endswith(".hub-dfq.tmp"), budget=10)
    before = s.snapshot()
    s.check(s.cli("info", "default", "--json", "r.json", "--overwrite"), code=2, message="No space left on device",
            before=before)


@fault("disk-full-onnx", area="disk full", what="`export q --out m.onnx --overwrite` (m.onnx exists) with the disk "
       "filling during the export", expected="exit 2 'No space left on device'; the old m.onnx intact")
def _(s):
    import torch

    ours(s, "checkpoint", "q")
    s.path("m.onnx").write_bytes(b"an earlier export")

    def full(module, args, f, **kwargs):
        Path(f).write_bytes(b"half an onnx")
        raise no_space(str(f))

    s.mp.setattr(torch.onnx, "export", full)
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "m.onnx", "--overwrite"), code=2, message="No space left on device",
            before=before)


@fault("file-size-limit-checkpoint", area="disk full",
       what="`quantize --out q` in a process whose files may not exceed 64 KB (RLIMIT_FSIZE: a real size-limited "
            "writer, whatever library writes)",
       expected="exit 2 'File too large'; no q, nothing staged left")
def _(s):
    before = s.snapshot()
    child = s.fork(*QUANT, "--out", "q", fsize=64 * 1024)
    s.check(child.result, code=2, message="File too large", before=before)
    assert not s.path("q").exists()


@fault("file-size-limit-synth", area="disk full",
       what="`synth --out d` limited to 4 KB per file (the first shard cannot be written), then `--resume`",
       expected="exit 2 'File too large ... --resume'; the rerun completes with the bytes of an uninterrupted run")
def _(s):
    child = s.fork(*SYNTH, "--out", "d", fsize=4 * 1024)
    s.check(child.result, code=2, message="File too large")
    s.check(s.cli(*SYNTH, "--out", "d", "--resume"), code=0)
    assert files(s.path("d/data")) == files(s.templates["dataset"] / "data")


@fault("disk-full-resume-state", area="disk full",
       what="`quantize --algorithm reconstruct` where saving its resume state fails with ENOSPC",
       expected="exit 0: the state is only a cache; the checkpoint equals an uninterrupted run's")
def _(s):
    def setup():
        import torch

        tiny_preset()

        def full(obj, f, *args, **kwargs):
            raise no_space(str(f))

        torch.save = full

    child = s.fork(*RECONSTRUCT, "--out", "q", setup=setup)
    s.check(child.result, code=0)
    assert files(s.path("q"))["model.safetensors"] == reference(s, RECONSTRUCT + ["--out", "q"], "q",
                                                                tiny_preset)["model.safetensors"]


# ==== SIGKILL, then the same command again ===========================================================

def _synth_killed_then_resumed(s, setup, *, rerun_flag="--resume"):
    child = s.fork(*BNS, "--out", "d", setup=setup)
    killed(s, child)
    before = s.snapshot()
    s.check(s.fork(*BNS, "--out", "d", rerun_flag).result, code=0, before=before,
            changed=("d/generation.json", "d/.hub-dfq.json"))
    assert dataset_bytes(s.path("d")) == reference(s, BNS + ["--out", "d"], "d")


@fault("sigkill-synth-before-shard", area="SIGKILL",
       what="`synth --method bns --out d` SIGKILLed as it starts shard k (k seeded-random), then `--resume`",
       expected="finished shards untouched; the rerun gives the bytes of an uninterrupted run")
def _(s):
    k = random.Random(1201).randint(1, 3)
    _synth_killed_then_resumed(s, kill_at("hub_dfq.synth.api:write_shard", call=k))


@fault("sigkill-synth-inside-shard-write", area="SIGKILL",
       what="`synth` SIGKILLed after shard k's temporary is written, before its rename, then `--resume`",
       expected="the half-done temporary is never read as a shard; the rerun gives identical bytes")
def _(s):
    k = random.Random(1202).randint(1, 3)
    _synth_killed_then_resumed(s, kill_at("pyarrow.parquet:write_table", call=k, after=True))


@fault("sigkill-synth-manifest", area="SIGKILL",
       what="`synth` SIGKILLed while it rewrites generation.json (call k, seeded-random), then `--resume`",
       expected="the rerun gives identical bytes")
def _(s):
    k = random.Random(1203).randint(1, 5)
    _synth_killed_then_resumed(s, kill_at("hub_dfq.synth.api:write_manifest", call=k))


@fault("sigkill-synth-random-time", area="SIGKILL",
       what="`synth` SIGKILLed after a seeded-random delay (0.3-3 s), then `--resume`",
       expected="whatever it had finished is kept; the rerun gives identical bytes")
def _(s):
    delay = random.Random(1204).uniform(0.3, 3.0)
    child = s.fork(*BNS, "--iters", "40", "--out", "d", wait=False)
    time.sleep(delay)
    finished = not child.process.is_alive()
    child.kill()
    s.steps.append("finished before the kill" if finished else "killed by signal 9")
    before = s.snapshot()
    s.check(s.fork(*BNS, "--iters", "40", "--out", "d", "--resume").result, code=0, before=before,
            changed=("d/generation.json", "d/.hub-dfq.json", "d/README.md", "d/preview.png"))
    assert dataset_bytes(s.path("d")) == reference(s, BNS + ["--iters", "40", "--out", "d"], "d")


@fault("sigkill-synth-overwrite-before-swap", area="SIGKILL",
       what="`synth --out d --overwrite --seed 5` over hub-dfq's dataset SIGKILLed just before the new folder is "
            "swapped in, then the same command",
       expected="d is the old dataset, byte for byte, after the kill; the rerun swaps in the new one, the user's "
                "file kept")
def _(s):
    ours(s, "dataset", "d", user_file=True)
    before = s.snapshot()
    child = s.fork(*BNS, "--seed", "5", "--out", "d", "--overwrite", setup=kill_at("hub_dfq.outputs:_swap_in"))
    killed(s, child, before)
    s.check(s.fork(*BNS, "--seed", "5", "--out", "d", "--overwrite").result, code=0)
    assert dataset_bytes(s.path("d")) == reference(s, BNS + ["--seed", "5", "--out", "d"], "d")
    assert s.path("d/my-notes.txt").read_text() == "the user's, not hub-dfq's\n"


@fault("sigkill-overwrite-between-renames", area="SIGKILL",
       what="`synth --out d --overwrite` without RENAME_EXCHANGE, SIGKILLed between its two renames (d is absent "
            "for that instant), then the same command",
       expected="the old dataset is whole beside d after the kill; the rerun puts it back, then replaces it")
def _(s):
    ours(s, "dataset", "d", user_file=True)
    old = files(s.path("d"))

    def no_exchange():
        import hub_dfq.outputs

        hub_dfq.outputs._exchange = lambda a, b: False

    child = s.fork(*BNS, "--seed", "5", "--out", "d", "--overwrite",
                   setup=chain(no_exchange, kill_at("os:rename", after=True)))
    killed(s, child)
    assert not s.path("d").exists()
    moved = next(s.project.glob(".d.hub-dfq-old-*"))
    assert files(moved) == old  # nothing lost: the old folder is whole, under a name the next run looks for
    s.check(s.fork(*BNS, "--seed", "5", "--out", "d", "--overwrite").result, code=0)
    assert dataset_bytes(s.path("d")) == reference(s, BNS + ["--seed", "5", "--out", "d"], "d")
    assert digest(s.path("d/my-notes.txt")) == old["my-notes.txt"]


@fault("sigkill-quantize-reconstruct", area="SIGKILL",
       what="`quantize --algorithm reconstruct --out q` SIGKILLed as block k starts (k seeded-random), then the "
            "same command",
       expected="the rerun resumes from the saved blocks and writes the bytes of an uninterrupted run")
def _(s):
    k = random.Random(1205).randint(2, 6)
    child = s.fork(*RECONSTRUCT, "--out", "q",
                   setup=chain(tiny_preset, kill_at("hub_dfq.quant.reconstruct:_fit_block", call=k)))
    killed(s, child)
    assert list(s.cache.glob("quantize/*/reconstruct.pt")), "nothing was saved to resume from"
    s.check(s.fork(*RECONSTRUCT, "--out", "q", setup=tiny_preset).result, code=0)
    assert files(s.path("q"))["model.safetensors"] == reference(s, RECONSTRUCT + ["--out", "q"], "q",
                                                                tiny_preset)["model.safetensors"]
    assert not list(s.cache.glob("quantize/*"))  # a finished run leaves no state behind


@fault("sigkill-quantize-saving-state", area="SIGKILL",
       what="`quantize --algorithm reconstruct` SIGKILLed inside torch.save of its resume state, then the same "
            "command",
       expected="the torn temporary is ignored; the rerun writes the bytes of an uninterrupted run")
def _(s):
    k = random.Random(1206).randint(2, 5)
    child = s.fork(*RECONSTRUCT, "--out", "q", setup=chain(tiny_preset, kill_at("torch:save", call=k, after=True)))
    killed(s, child)
    s.check(s.fork(*RECONSTRUCT, "--out", "q", setup=tiny_preset).result, code=0)
    assert files(s.path("q"))["model.safetensors"] == reference(s, RECONSTRUCT + ["--out", "q"], "q",
                                                                tiny_preset)["model.safetensors"]


@fault("sigkill-save-pretrained-staging", area="SIGKILL",
       what="`quantize --out q --overwrite` over hub-dfq's checkpoint SIGKILLed once the new weights are staged, "
            "then the same command",
       expected="q is the old checkpoint, byte for byte, after the kill; the rerun replaces it, the user's file kept")
def _(s):
    ours(s, "checkpoint", "q", user_file=True)
    before = s.snapshot()
    argv = [*QUANT, "--weights", "5", "--out", "q", "--overwrite"]
    child = s.fork(*argv, setup=kill_at("hub_dfq.hub.checkpoint:write_safetensors", after=True))
    killed(s, child, before)
    s.check(s.fork(*argv).result, code=0)
    expected = reference(s, [*QUANT, "--weights", "5", "--out", "q"], "q")
    assert files(s.path("q"))["model.safetensors"] == expected["model.safetensors"]
    assert s.path("q/my-notes.txt").exists()


@fault("sigkill-save-pretrained-after-swap", area="SIGKILL",
       what="`quantize --out q --overwrite` SIGKILLed right after the atomic exchange, before the old folder is "
            "removed, then the same command",
       expected="q is the new checkpoint, complete, with the user's file; the next run removes the old one")
def _(s):
    ours(s, "checkpoint", "q", user_file=True)
    argv = [*QUANT, "--weights", "5", "--out", "q", "--overwrite"]
    child = s.fork(*argv, setup=kill_at("hub_dfq.outputs:_discard_old"))
    killed(s, child)
    expected = reference(s, [*QUANT, "--weights", "5", "--out", "q"], "q")
    assert files(s.path("q"))["model.safetensors"] == expected["model.safetensors"]
    assert s.path("q/my-notes.txt").read_text() == "the user's, not hub-dfq's\n"
    assert litter(s.root)  # the old folder, beside q
    s.check(s.fork(*argv).result, code=0)


def _push_killed(s, point: str, after: bool) -> None:
    from hub_server import WRITE_TOKEN

    repo = s.hub.new_repo_id("killed")
    s.mp.setenv("HF_TOKEN", WRITE_TOKEN)
    argv = [*QUANT, "--push-to-hub", repo]
    child = s.fork(*argv, setup=kill_at(point, after=after))
    killed(s, child)
    assert not s.hub.repo_exists(repo) or len(s.hub.commits(repo)) == 1, "a killed push left a commit"
    s.check(s.fork(*argv).result, code=0)
    commits = s.hub.commits(repo)
    assert len(commits) == 2  # the Hub's initial commit and one complete upload
    pushed = s.hub.list_files(repo)
    expected = reference(s, [*QUANT, "--out", "q"], "q")
    import hashlib

    assert hashlib.sha256(pushed["model.safetensors"]).hexdigest() == expected["model.safetensors"]
    assert ".hub-dfq.json" not in pushed


@fault("sigkill-push-before-commit", area="SIGKILL",
       what="`quantize --push-to-hub REPO` SIGKILLed as it creates the commit (the local Hub server), then again",
       expected="no partial commit on the Hub; the rerun makes one commit with the bytes of a local save")
def _(s):
    _push_killed(s, "huggingface_hub.hf_api:HfApi.create_commit", after=False)


@fault("sigkill-push-during-upload", area="SIGKILL",
       what="`quantize --push-to-hub REPO` SIGKILLed after its first LFS file is uploaded, then again",
       expected="no commit from the killed run; the rerun makes one complete commit")
def _(s):
    _push_killed(s, "huggingface_hub._commit_api:lfs_upload", after=True)


# ==== corrupted cache entries =======================================================================

def _calibrated_twice(s, damage) -> None:
    argv = [*GAUSSIAN, "--json", "r.json"]
    s.check(s.cli(*argv), code=0)
    first = json_file(s.path("r.json"))
    entry = next(p for p in (s.cache / "synth").iterdir() if p.is_dir())
    shard = next(entry.glob("data/*.parquet"))
    good = digest(shard)
    damage(entry)
    s.check(s.cli(*argv, "--overwrite"), code=0)  # --overwrite: the rerun replaces its own --json
    again = json_file(s.path("r.json"))
    assert again["calibration_provenance"]["fingerprint"] == first["calibration_provenance"]["fingerprint"]
    assert digest(shard) == good  # regenerated to the same bytes
    return None


@fault("cache-synth-shard-corrupt", area="cache",
       what="`quantize --calibration gaussian` after a byte of its cached shard was flipped",
       expected="exit 0: the shard fails its checksum and is generated again, to the same bytes")
def _(s):
    def flip(entry):
        shard = next(entry.glob("data/*.parquet"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))

    _calibrated_twice(s, flip)


@fault("cache-synth-manifest-corrupt", area="cache",
       what="`quantize --calibration gaussian` after the cached generation.json was overwritten with garbage",
       expected="exit 0: the damaged entry is generated again (a warning), same calibration")
def _(s):
    _calibrated_twice(s, lambda entry: (entry / "generation.json").write_text("{garbage"))


@fault("cache-synth-shard-missing", area="cache",
       what="`quantize --calibration gaussian` after the cached shard was deleted",
       expected="exit 0: the missing shard is generated again, same bytes")
def _(s):
    _calibrated_twice(s, lambda entry: next(entry.glob("data/*.parquet")).unlink())


@fault("cache-audit-reference-corrupt", area="cache",
       what="`audit --references gaussian` after its cached reference point was overwritten with garbage",
       expected="exit 0: the reference is measured again; the same report")
def _(s):
    argv = [*[a if a != "none" else "gaussian" for a in AUDIT], "--json", "r.json"]
    s.check(s.cli(*argv), code=0)
    first = json_file(s.path("r.json"))
    entry = next((s.cache / "audit").glob("*.json"))
    entry.write_text("[1, 2")
    s.check(s.cli(*argv, "--overwrite"), code=0)
    assert json_file(s.path("r.json"))["references"]["far"]["divergence"] == first["references"]["far"]["divergence"]
    assert json_file(entry)["divergence"] == first["references"]["far"]["divergence"]


@fault("cache-resume-state-corrupt", area="cache",
       what="`quantize --algorithm reconstruct` killed mid-way, its saved state then truncated, then rerun",
       expected="exit 0: the unreadable state is ignored (a warning); the bytes of an uninterrupted run")
def _(s):
    child = s.fork(*RECONSTRUCT, "--out", "q",
                   setup=chain(tiny_preset, kill_at("hub_dfq.quant.reconstruct:_fit_block", call=4)))
    killed(s, child)
    state = next(s.cache.glob("quantize/*/reconstruct.pt"))
    state.write_bytes(state.read_bytes()[:100])
    s.check(s.fork(*RECONSTRUCT, "--out", "q", setup=tiny_preset).result, code=0)
    assert files(s.path("q"))["model.safetensors"] == reference(s, RECONSTRUCT + ["--out", "q"], "q",
                                                                tiny_preset)["model.safetensors"]


# ==== second pass (#19): every written file, non-finite numbers, edited checkpoints, inputs before work =====

def float_copy(s: Sandbox, rel: str = "m", edit=None) -> Path:
    """A copy of the embedded float model in the project, its tensors edited by ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    from hub_dfq.models.loader import default_model_dir

    target = s.path(rel)
    shutil.copytree(default_model_dir(), target)
    if edit is not None:
        tensors = load_file(target / "model.safetensors")
        edit(tensors)
        save_file(tensors, target / "model.safetensors")
    return target


def edited_checkpoint(s: Sandbox, *, config=None, tensors=None) -> Path:
    """hub-dfq's W8A8 checkpoint copied to q, its quantization_config edited by ``config(qc)``, its tensors by
    ``tensors(dict)`` (as a user with a text editor or a script would)."""
    from safetensors.torch import load_file, save_file

    q = ours(s, "checkpoint", "q")
    if config is not None:
        data = json_file(q / "config.json")
        config(data["quantization_config"])
        (q / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        loaded = load_file(q / "model.safetensors")
        tensors(loaded)
        save_file(loaded, q / "model.safetensors", metadata={"format": "pt"})
    return q


def first_key(tensors: dict, suffix: str, skip: int = 0) -> str:
    return [k for k in sorted(tensors) if k.endswith(suffix)][skip]


def no_quantize(s: Sandbox) -> None:
    """Fail the case if quantization starts: what the run needs is checked before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("quantization started before the inputs were checked")

    s.mp.setattr("hub_dfq.quant.api.quantize", refuse)


def rows_parquet(path: Path, labels: list, *, label_type: str) -> Path:
    rows = hub_dfq.load_images("default", limit=len(labels)).dataset
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value(label_type)})
    datasets.Dataset.from_dict({"img": rows["img"], "label": labels}, features=features).to_parquet(path)
    return path


@fault("json-existing-file-no-overwrite", area="data loss", what="`info default --json notes.txt` (the user's notes)",
       expected="exit 2 'pass --overwrite' before any work; notes.txt intact")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli("info", "default", "--json", "notes.txt"), code=2, message="pass --overwrite", before=before)


@fault("json-over-model-weights", area="data loss",
       what="`eval m --limit 16 --json m/model.safetensors --overwrite` (the weights it reads; the report of #19)",
       expected="exit 2 'which this command reads' before any work; the weights intact")
def _(s):
    float_copy(s)
    no_work(s)
    before = s.snapshot()
    s.check(s.cli("eval", "m", "--limit", "16", "--json", "m/model.safetensors", "--overwrite"), code=2,
            message="which this command reads", before=before)


@fault("json-inside-out", area="data loss",
       what="`quantize ... --out qj --json qj/config.json` (a file of the checkpoint it writes; the report of #19)",
       expected="exit 2 'which this command writes' before any work; no qj")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*GAUSSIAN, "--out", "qj", "--json", "qj/config.json"), code=2, message="which this command writes",
            before=before)
    assert not s.path("qj").exists()


@fault("json-over-checkpoint-file", area="data loss",
       what="`info default --json q/config.json --overwrite` where q is a checkpoint hub-dfq wrote",
       expected="exit 2 'part of a quantized checkpoint'; q intact and loadable")
def _(s):
    ours(s, "checkpoint", "q")
    before = s.snapshot()
    s.check(s.cli("info", "default", "--json", "q/config.json", "--overwrite"), code=2,
            message="part of a quantized checkpoint", before=before)
    s.check(s.cli("info", "q"), code=0)


@fault("json-fifo", area="data loss", what="`info default --json pipe --overwrite` where pipe is a FIFO",
       expected="exit 2 'not a regular file' at once (no hang); the FIFO still there")
def _(s):
    pipe = s.root.parent / "pipe"  # outside the checksummed sandbox: reading a FIFO would block the check itself
    os.mkfifo(pipe)
    before = s.snapshot()
    s.check(s.cli("info", "default", "--json", str(pipe), "--overwrite"), code=2, message="not a regular file",
            before=before)
    assert pipe.is_fifo()


@fault("json-symlink", area="data loss", what="`info default --json link.json --overwrite` where the link points at "
       "notes.txt", expected="exit 2 'is a symbolic link'; the link and notes.txt intact")
def _(s):
    s.path("link.json").symlink_to(s.path("notes.txt"))
    before = s.snapshot()
    s.check(s.cli("info", "default", "--json", "link.json", "--overwrite"), code=2, message="is a symbolic link",
            before=before)


@fault("export-over-checkpoint-weights", area="data loss",
       what="`export q --out q/model.safetensors --overwrite` (the checkpoint it reads)",
       expected="exit 2 'which this command reads' before the checkpoint is read; q intact")
def _(s):
    ours(s, "checkpoint", "q")
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "q/model.safetensors", "--overwrite"), code=2,
            message="which this command reads", before=before)


@fault("json-same-as-onnx", area="data loss", what="`export q --out m.onnx --json m.onnx`",
       expected="exit 2 'which this command writes'; nothing written")
def _(s):
    ours(s, "checkpoint", "q")
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "m.onnx", "--json", "m.onnx"), code=2, message="which this command writes",
            before=before)
    assert not s.path("m.onnx").exists()


@fault("cache-clear-keeps-other-output", area="data loss",
       what="`cache clear` where the cache folder also holds an audit report, a dataset hub-dfq wrote with `--out` "
       "and an entry-shaped folder without the cache's record (the report of #19)",
       expected="exit 0; only the recorded entry is removed; `cache list` shows nothing else")
def _(s):
    s.check(s.cli(*GAUSSIAN), code=0)  # a real cache entry (synthetic calibration images)
    shutil.copytree(s.templates["audit"], s.cache / "audit")  # `audit --out $CACHE/audit`
    shutil.copytree(s.templates["dataset"], s.cache / "synth" / "gaussian-0123456789abcdef0123")  # entry-shaped
    kept = {p: d for p, d in tree(s.cache).items() if "gaussian-0123" in p or p.startswith("audit")}
    s.check(s.cli("cache", "list", "--json", "list.json"), code=0)
    assert len(json_file(s.path("list.json"))["entries"]) == 1
    s.check(s.cli("cache", "clear"), code=0)
    assert {p: d for p, d in tree(s.cache).items() if p in kept} == kept
    assert [p.name for p in (s.cache / "synth").iterdir()] == ["gaussian-0123456789abcdef0123"]


@fault("cache-clear-negative-age", area="data loss", what="`cache clear --older-than -1`, then `--older-than nan`",
       expected="exit 2 'must be a finite number of at least 0' both times; the cache intact")
def _(s):
    s.check(s.cli(*GAUSSIAN), code=0)
    before = s.snapshot()
    for age in ("-1", "nan"):
        s.check(s.cli("cache", "clear", "--older-than", age), code=2, message="must be a finite number", before=before)
    s.check(s.api(lambda: hub_dfq.cache.clear_cache(older_than_days=-1), builtin=ValueError), code=2,
            message="0 or more", before=before)


@fault("eval-batch-size-0", area="hang", what="`eval default --batch-size 0` (looped for ever), then `-1` (exit 1)",
       expected="exit 2 'must be a positive whole number' at once, both")
def _(s):
    from hub_dfq.models.loader import load_model

    model = load_model("default")
    s.check(s.api(lambda: hub_dfq.evaluate_accuracy(model, "default", batch_size=0), builtin=ValueError), code=2,
            message="`batch_size` must be a positive integer")
    no_work(s)
    for size in ("0", "-1"):
        s.check(s.cli("eval", "default", "--batch-size", size), code=2, message="must be a positive whole number")


@fault("cli-numbers-out-of-range", area="hang",
       what="13 numbers out of range: audit --bootstrap -1 / --score-batch 0 / --seed -3; export --opset 5; synth "
       "--shard-size 0 / --num-images -4 / --lr 0 / --lr inf; quantize --seed 2^40 / --num-processes 0; "
       "eval --limit 0 / --limit abc; synth --batch-size 0",
       expected="exit 2 with one line naming the flag, before any work, every one")
def _(s):
    no_work(s)
    before = s.snapshot()
    bad = [((*AUDIT, "--bootstrap", "-1"), "--bootstrap"), ((*AUDIT, "--score-batch", "0"), "--score-batch"),
           ((*AUDIT, "--seed", "-3"), "--seed"), (("export", "q", "--opset", "5"), "--opset"),
           ((*SYNTH, "--out", "d", "--shard-size", "0"), "--shard-size"),
           ((*SYNTH, "--out", "d", "--num-images", "-4"), "--num-images"),
           ((*SYNTH, "--out", "d", "--lr", "0"), "--lr"), ((*SYNTH, "--out", "d", "--lr", "inf"), "--lr"),
           ((*QUANT, "--seed", str(2**40)), "--seed"), ((*QUANT, "--num-processes", "0"), "--num-processes"),
           (("eval", "default", "--limit", "0"), "--limit"), (("eval", "default", "--limit", "abc"), "--limit"),
           ((*SYNTH, "--out", "d", "--batch-size", "0"), "--batch-size")]
    for argv, flag in bad:
        s.check(s.cli(*argv), code=2, message=flag, before=before)


@fault("model-nan-weight", area="silent non-finite",
       what="`quantize m --out q`, `eval m`, `export`-free: m's conv weight holds a NaN (quantized with a NaN scale, "
       "exit 0, before)", expected="exit 2 naming the tensor ('layer1.0.conv1.weight holds nan'); no q")
def _(s):
    def poison(t):
        t["layer1.0.conv1.weight"].view(-1)[7] = float("nan")

    float_copy(s, edit=poison)
    before = s.snapshot()
    s.check(s.cli(*GAUSSIAN[:1], "m", *GAUSSIAN[2:], "--out", "q"), code=2,
            message="layer1.0.conv1.weight holds nan", before=before)
    s.check(s.cli("eval", "m", "--limit", "16"), code=2, message="holds nan", before=before)
    assert not s.path("q").exists()


@fault("model-negative-variance", area="silent non-finite",
       what="`audit m default` where a BN running_var is negative (the audit reported inf)",
       expected="exit 2 'a negative variance', naming the buffer")
def _(s):
    def negative(t):
        t[first_key(t, "running_var", 2)][1] = -0.5

    float_copy(s, edit=negative)
    before = s.snapshot()
    s.check(s.cli("audit", "m", "default", "--limit", "16", "--references", "none", "--bootstrap", "0"), code=2,
            message="negative variance", before=before)


@fault("model-inf-bn-statistic", area="silent non-finite",
       what="`synth m --method bns` where a BN running_mean holds Inf (synthesis blamed --lr), and "
       "`hub_dfq.synthesize` on a model whose running_var is made NaN in Python",
       expected="exit 2 naming the buffer, both before any step")
def _(s):
    def infinite(t):
        t[first_key(t, "running_mean", 1)][0] = float("inf")

    float_copy(s, edit=infinite)
    before = s.snapshot()
    s.check(s.cli(*BNS[:1], "m", *BNS[2:], "--out", "d"), code=2, message="running_mean holds inf", before=before)
    from hub_dfq.models.loader import load_model

    model = load_model("default")
    model.bn_layers[0][1].running_var[0] = float("nan")
    s.check(s.api(lambda: hub_dfq.synthesize(model, "bns", 8, progress=False), builtin=ValueError), code=2,
            message="running_var holds nan", before=before)


@fault("checkpoint-nan-scale", area="silent non-finite", what="`eval q` where a weight scale in q is NaN",
       expected="exit 2 naming the scale tensor")
def _(s):
    edited_checkpoint(s, tensors=lambda t: t[first_key(t, "weight_quantizer.scale", 3)].__setitem__(0, float("nan")))
    before = s.snapshot()
    s.check(s.cli("eval", "q", "--limit", "16"), code=2, message="weight_quantizer.scale holds nan", before=before)


@fault("checkpoint-negative-scale", area="edited checkpoint", what="`eval q` where a weight scale in q is -1",
       expected="exit 2 'scales must be positive'")
def _(s):
    edited_checkpoint(s, tensors=lambda t: t[first_key(t, "weight_quantizer.scale", 3)].__setitem__(0, -1.0))
    before = s.snapshot()
    s.check(s.cli("eval", "q", "--limit", "16"), code=2, message="scales must be positive", before=before)


@fault("checkpoint-bits-edited", area="edited checkpoint",
       what="`eval q` after config.json's default weight bits were edited 8 -> 4, then 8 -> 7 (loaded silently at "
       "19% before)", expected="exit 2 'not 4-bit packing', then 'outside the 7-bit range'")
def _(s):
    def bits(b):
        return lambda qc: qc["config"]["default"].__setitem__("weights", b)

    edited_checkpoint(s, config=bits(4))
    before = s.snapshot()
    s.check(s.cli("eval", "q", "--limit", "16"), code=2, message="not 4-bit packing", before=before)
    shutil.rmtree(s.path("q"))
    edited_checkpoint(s, config=bits(7))
    s.check(s.cli("eval", "q", "--limit", "16"), code=2, message="outside the 7-bit range")


@fault("checkpoint-zero-point", area="edited checkpoint", what="`eval q` where an activation zero point is 100000",
       expected="exit 2 'zero point 100000, outside its 8-bit range'")
def _(s):
    edited_checkpoint(s, tensors=lambda t: t[first_key(t, "zero_point", 1)].fill_(100000))
    before = s.snapshot()
    s.check(s.cli("eval", "q", "--limit", "16"), code=2, message="zero point 100000, outside", before=before)


@fault("checkpoint-summary-bits", area="edited checkpoint",
       what="`info q` where only quantization_config.weights was edited to 3 (info said W3A8)",
       expected="exit 2 'quantization_config.weights says 3'")
def _(s):
    edited_checkpoint(s, config=lambda qc: qc.__setitem__("weights", 3))
    before = s.snapshot()
    s.check(s.cli("info", "q"), code=2, message="quantization_config.weights says 3", before=before)


@fault("quantize-eval-labels-before-work", area="work thrown away",
       what="`quantize --algorithm reconstruct --eval p.parquet --out q` whose labels go up to 99",
       expected="exit 2 'has label 99' before quantizing; no q")
def _(s):
    labelled_parquet(s.path("p.parquet"), [3, 1, 99, 2])
    no_quantize(s)
    before = s.snapshot()
    argv = [a if a != "none" else "p.parquet" for a in QUANT]  # --eval p.parquet
    s.check(s.cli(*argv, "--algorithm", "reconstruct", "--out", "q"), code=2, message="has label 99", before=before)
    assert not s.path("q").exists()


@fault("push-name-before-work", area="work thrown away",
       what="`quantize --push-to-hub 'my model'`, `--push-dataset a/b/c`, `synth --push-to-hub me/bad..name`",
       expected="exit 2 'is not a Hub repository name' before the model is loaded, all three")
def _(s):
    no_work(s)
    before = s.snapshot()
    s.check(s.cli(*GAUSSIAN, "--push-to-hub", "my model"), code=2, message="is not a Hub repository name",
            before=before)
    s.check(s.cli(*GAUSSIAN, "--push-to-hub", "me/q", "--push-dataset", "a/b/c"), code=2,
            message="--push-dataset 'a/b/c' is not a Hub repository name", before=before)
    s.check(s.cli(*SYNTH, "--out", "d", "--push-to-hub", "me/bad..name"), code=2,
            message="is not a Hub repository name", before=before)


@fault("override-matches-nothing", area="silent acceptance", what="`quantize --override 'layr3.*:weights=8' --out q`",
       expected="exit 2 'matches no layer' before calibration; no q")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*GAUSSIAN, "--override", "layr3.*:weights=8", "--out", "q"), code=2, message="matches no layer",
            before=before)
    assert not s.path("q").exists()


@fault("exclude-everything", area="silent acceptance",
       what="`quantize --exclude '*' --out q` (saved a W4A4-tagged float model whose card said every weight is an "
       "integer), then `--exclude 'layer3.*'`", expected="exit 2 'nothing is left to quantize'; no q; the partial "
       "exclude saves a card that names the float layers and claims integers only for the others")
def _(s):
    before = s.snapshot()
    s.check(s.cli(*GAUSSIAN, "--exclude", "*", "--out", "q"), code=2, message="nothing is left to quantize",
            before=before)
    assert not s.path("q").exists()
    s.check(s.cli(*GAUSSIAN, "--exclude", "layer3.*", "--out", "q"), code=0)  # a partial exclude: the card says so
    card = s.path("q/README.md").read_text()
    assert "Every weight of the quantized layers is stored as an integer" in card and "`layer3.0.conv1`" in card


@fault("config-sizes-malformed", area="silent acceptance",
       what="`info m` with config.json's num_classes 'ten', then 1e12, input_size [3, 0, 0], [3, 100000, 100000], "
       "[3, 32] (exit 1 or hundreds of GB allocated before)",
       expected="exit 2 naming the key and the range, every one, at once")
def _(s):
    m = float_copy(s)
    original = json_file(m / "config.json")
    for key, value, named in [("num_classes", "ten", "num_classes is 'ten'"), ("num_classes", 1e12, "num_classes"),
                              ("input_size", [3, 0, 0], "input_size is [3, 0, 0]"),
                              ("input_size", [3, 100000, 100000], "sides of 1 to 4096"),
                              ("input_size", [3, 32], "[channels, height, width]")]:
        config = json.loads(json.dumps(original))
        (config if key == "num_classes" else config["pretrained_cfg"])[key] = value
        (m / "config.json").write_text(json.dumps(config))
        s.check(s.cli("info", "m"), code=2, message=named)


@fault("eval-labels-not-integers", area="silent acceptance",
       what="`eval` on parquets whose labels are strings ('cat'), floats (2.5, truncated before), and with "
       "`--label-column img` (exit 1 before)", expected="exit 2 'which is not a class index', every one")
def _(s):
    rows_parquet(s.path("text.parquet"), ["cat", "dog"], label_type="string")
    rows_parquet(s.path("float.parquet"), [1.0, 2.5], label_type="float64")
    before = s.snapshot()
    for argv, message in [(("--dataset", "text.parquet"), "label 'cat', which is not a class index"),
                          (("--dataset", "float.parquet"), "label 2.5, which is not a class index"),
                          (("--label-column", "img", "--limit", "4"), "which is not a class index")]:
        s.check(s.cli("eval", "default", *argv), code=2, message=message, before=before)
    rows_parquet(s.path("whole.parquet"), [1.0, 2.0], label_type="float64")  # whole numbers stored as floats: fine
    s.check(s.cli("eval", "default", "--dataset", "whole.parquet"), code=0)


@fault("images-every-mode", area="silent acceptance",
       what="the model's preprocessing on a 16-bit gray PNG gradient (clipped to white before), a float image in "
       "[0, 1], CMYK red, a palette, LA and premultiplied-alpha images",
       expected="pixels kept: the 16-bit gradient averages mid-gray, CMYK red is red, every mode converts")
def _(s):
    import io

    import numpy as np
    from PIL import Image

    from hub_dfq.models.loader import load_model

    unit = load_model("default").preprocess.to_unit
    gradient = Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16))
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")
    png = Image.open(io.BytesIO(buffer.getvalue()))
    assert png.mode.startswith("I") and abs(float(unit(png).mean()) - 0.5) < 0.01
    assert abs(float(unit(Image.fromarray(np.full((32, 32), 0.25, np.float32))).mean()) - 0.25) < 0.01
    red = unit(Image.new("CMYK", (32, 32), (0, 255, 255, 0)))
    assert red[0].min() > 0.99 and red[1:].max() < 0.01
    for mode in ("P", "PA", "LA", "La", "RGBa", "1", "I;16B", "YCbCr", "HSV", "LAB"):
        assert unit(Image.new(mode, (32, 32))).shape == (3, 32, 32), mode
    s.steps.append("exit 0")


# ==== the second trial of bad inputs (issue #19): docs/reliability-trial.md ==========================

@fault("flags-that-do-nothing", area="silent acceptance",
       what="`quantize --out ''`, `--json ''`, `--eval ''` (each skipped its output or evaluation, exit 0) and "
       "`--private` without `--push-to-hub`",
       expected="exit 2 'is empty' / 'only applies with --push-to-hub', before any work, every one")
def _(s):
    no_work(s)
    before = s.snapshot()
    for flag in ("--out", "--json", "--eval"):
        s.check(s.cli(*QUANT, flag, ""), code=2, message=f"{flag} is empty", before=before)
    s.check(s.cli(*QUANT, "--private"), code=2, message="--private only applies with --push-to-hub", before=before)


@fault("output-names-odd", area="traceback",
       what="`quantize --out` and `--json` naming a 300-character file (exit 1, ENAMETOOLONG), and "
       "`export q --out newdir/` (wrote a file named newdir)",
       expected="exit 2 'more than file systems allow' / 'names a folder'; nothing written")
def _(s):
    ours(s, "checkpoint", "q")
    before = s.snapshot()
    s.check(s.cli(*QUANT, "--out", "x" * 300), code=2, message="more than file systems allow", before=before)
    s.check(s.cli("info", "default", "--json", "y" * 300 + ".json"), code=2, message="more than file systems allow",
            before=before)
    s.check(s.cli("export", "q", "--out", "newdir/"), code=2, message="names a folder", before=before)
    assert not s.path("newdir").exists()


@fault("json-overwrite-after-work", area="work thrown away",
       what="`score default default --json r.json --overwrite` where r.json exists (refused after the scoring: its "
       "second check forgot --overwrite)", expected="exit 0; r.json replaced by the report")
def _(s):
    s.path("r.json").write_text("old\n")
    s.check(s.cli("score", "default", "default", "--limit", "8", "--no-progress", "--json", "r.json", "--overwrite"),
            code=0)
    assert json_file(s.path("r.json"))["dataset"] == "default"


@fault("export-labels-before-write", area="work thrown away",
       what="`export q --out m.onnx --dataset p.parquet` whose labels go up to 99 (m.onnx written, then exit 2)",
       expected="exit 2 'has label 99' before the ONNX file is written; no m.onnx")
def _(s):
    ours(s, "checkpoint", "q")
    labelled_parquet(s.path("p.parquet"), [3, 1, 99, 2])
    before = s.snapshot()
    s.check(s.cli("export", "q", "--out", "m.onnx", "--dataset", "p.parquet"), code=2, message="has label 99",
            before=before)
    assert not s.path("m.onnx").exists()


@fault("cli-numbers-out-of-range-2", area="hang",
       what="`quantize --calibration gaussian --calibration-images 10^12` and `synth --num-images 10^14` (planned "
       "for ever), `synth --method gaussian --iters -5`, `score --seed -1`, `--max-score nan` (kept no image, "
       "exit 0), `--calibration-iters 0`, `--shard-size 0`; `synthesize(n=10^12)`, `score_images(max_score=nan)`, "
       "`score_images(batch_size='64')` (TypeError)",
       expected="exit 2 with one line naming the flag or argument, at once, every one")
def _(s):
    before = s.snapshot()
    s.check(s.api(lambda: hub_dfq.synthesize("default", "gaussian", 10**12, progress=False), builtin=ValueError),
            code=2, message="more than hub-dfq generates", before=before)
    s.check(s.api(lambda: hub_dfq.score_images("default", "default", limit=8, max_score=float("nan")),
                  builtin=ValueError), code=2, message="`max_score` must be a finite number", before=before)
    s.check(s.api(lambda: hub_dfq.score_images("default", "default", limit=8, batch_size="64"), builtin=ValueError),
            code=2, message="must be positive", before=before)
    no_work(s)
    score = ["score", "default", "default", "--limit", "8", "--no-progress"]
    bad = [((*GAUSSIAN, "--calibration-images", str(10**12)), "--calibration-images is 1,000,000,000,000"),
           ((*SYNTH, "--out", "d", "--num-images", str(10**14)), "--num-images"),
           ((*SYNTH, "--out", "d", "--iters", "-5"), "--iters"), ((*score, "--seed", "-1"), "--seed"),
           ((*score, "--max-score", "nan"), "--max-score"),
           ((*score, "--calibration-iters", "0"), "--calibration-iters"),
           ((*score, "--shard-size", "0"), "--shard-size")]
    for argv, flag in bad:
        s.check(s.cli(*argv), code=2, message=flag, before=before)


@fault("config-preprocessing-damaged", area="silent non-finite",
       what="`eval m` where config.json's std is 0, NaN or negative (inputs of Inf/NaN, an accuracy printed, exit 0), "
       "mean has 2 values, crop_pct -1 or 'big', interpolation 'sharpest', crop_mode 'diagonal', 8 label_names for "
       "10 classes (exit 0 or 1 before)", expected="exit 2 naming the key and what it must be, every one")
def _(s):
    m = float_copy(s)
    original = json_file(m / "config.json")
    cases = [("std", [0.0, 0.224, 0.225], "above 0"), ("std", [float("nan"), 0.2, 0.2], "std is [nan"),
             ("std", [-0.229, 0.224, 0.225], "above 0"), ("mean", [0.5, 0.5], "3 finite numbers"),
             ("crop_pct", -1.0, "crop_pct is -1.0"), ("crop_pct", "big", "crop_pct is 'big'"),
             ("interpolation", "sharpest", "must be one of nearest"), ("crop_mode", "diagonal", "center, squash"),
             ("label_names", list("abcdefgh"), "a list of 10 class names")]
    for key, value, message in cases:
        config = json.loads(json.dumps(original))
        config["pretrained_cfg"][key] = value
        (m / "config.json").write_text(json.dumps(config))
        s.check(s.cli("eval", "m", "--limit", "8"), code=2, message=message)


@fault("config-wrong-json-types", area="traceback",
       what="`info m` with architecture 42, pretrained_cfg a list, quantization_config a string, id2label keys "
       "'x'/'y', and a config.json nested 100,000 deep (AttributeError, RecursionError: exit 1 before)",
       expected="exit 2 naming the key (or 'is not valid JSON'), every one")
def _(s):
    m = float_copy(s)
    original = json_file(m / "config.json")
    for key, value, message in [("architecture", 42, "architecture is 42"),
                                ("pretrained_cfg", [1, 2, 3], "must be a JSON object"),
                                ("quantization_config", "w8a8", "quantization_config is 'w8a8'"),
                                ("id2label", {"x": "cat", "y": "dog"}, "a mapping from class indices")]:
        (m / "config.json").write_text(json.dumps({**original, key: value}))
        s.check(s.cli("info", "m"), code=2, message=message)
    (m / "config.json").write_text("[" * 100000 + "]" * 100000)
    s.check(s.cli("info", "m"), code=2, message="is not valid JSON")


@fault("weights-stored-as-integers", area="silent acceptance",
       what="`eval m` where model.safetensors stores every float tensor as int32 (loaded as whole numbers, an "
       "accuracy printed, exit 0)", expected="exit 2 'stores ... as I32, but it is a floating-point weight'")
def _(s):
    import torch

    float_copy(s, edit=lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if v.is_floating_point()}))
    s.check(s.cli("eval", "m", "--limit", "8"), code=2, message="as I32, but it is a floating-point weight")


@fault("weights-overflow-float32", area="traceback",
       what="`quantize m` where one conv weight is 3e38 (finite, so loaded; the activations overflow: exit 1, "
       "FloatingPointError)", expected="exit 2 'overflow float32'; no q")
def _(s):
    float_copy(s, edit=lambda t: t["layer1.0.conv1.weight"].view(-1).__setitem__(3, 3e38))
    before = s.snapshot()
    s.check(s.cli(*GAUSSIAN[:1], "m", *GAUSSIAN[2:], "--out", "q"), code=2, message="overflow float32", before=before)
    assert not s.path("q").exists()


@fault("push-endpoint-unreachable", area="traceback",
       what="`push_folder` of a checkpoint to a Hub endpoint nothing listens on (httpx's ConnectError: exit 1)",
       expected="PublishError (exit 2) 'uploading ... failed ... nothing was committed'")
def _(s):
    from huggingface_hub import constants

    from hub_dfq.publish import push_folder

    q = ours(s, "checkpoint", "q")
    s.mp.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    s.mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = s.snapshot()
    s.check(s.api(lambda: push_folder(q, "me/m", token="hf_x")), code=2, message="nothing was committed",
            before=before)


@fault("cache-location-is-file", area="silent acceptance",
       what="`cache list` and `cache clear` with HUB_DFQ_CACHE naming the user's notes.txt ('0 entries in notes.txt', "
       "exit 0)", expected="exit 2 'is not a folder'; notes.txt intact")
def _(s):
    s.mp.setenv("HUB_DFQ_CACHE", str(s.path("notes.txt")))
    before = s.snapshot()
    for action in ("list", "clear"):
        s.check(s.cli("cache", action), code=2, message="is not a folder", before=before)


@fault("sigterm-cleans-up", area="SIGTERM",
       what="`synth --method bns --out d` sent SIGTERM mid-run (died where it stood, its lock file left beside d), "
       "then `--resume`", expected="exit 143 'terminated', no lock or temporary left; the rerun gives the bytes of an "
                                   "uninterrupted run")
def _(s):
    started = s.root / "started"
    child = s.fork(*BNS, "--iters", "40", "--out", "d", wait=False,
                   setup=lambda: _touch_when("hub_dfq.synth.api:synthesize_folder", started))
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGTERM)
    child.wait()
    result = child.result  # 143 and one 'terminated' line; 0 if the run was over before the signal
    assert result.code in (143, 0) and "Traceback" not in result.err, result.err[-2000:]
    assert result.code == 0 or result.message == "hub-dfq synth: terminated", result.err[-2000:]
    assert not litter(s.root), litter(s.root)
    s.steps.append("exit 143: “terminated”" if result.code == 143 else "finished before the signal")
    before = s.snapshot()
    s.check(s.fork(*BNS, "--iters", "40", "--out", "d", "--resume").result, code=0, before=before,
            changed=("d/generation.json", "d/.hub-dfq.json", "d/README.md", "d/preview.png"))
    assert dataset_bytes(s.path("d")) == reference(s, BNS + ["--iters", "40", "--out", "d"], "d")


def _touch_when(target: str, path: Path) -> None:
    """(In a child) create ``path`` when ``module:attribute`` is first called: the run has really started."""
    import importlib

    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def touching(*args, **kwargs):
        path.touch()
        return original(*args, **kwargs)

    setattr(module, name, touching)


def test_table_renders():
    text = table_markdown()
    assert text.count("\n") == len(FAULTS) + 2 and "| id |" in text
    assert errno.ENOSPC  # the disk-full cases raise the real errno
