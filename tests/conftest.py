"""Test-wide setup: an isolated HF cache, the local Hub server, and paths to the shared checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or datasets: they read these at import time.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="hub-dfq-tests-"))
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["HUB_DFQ_CACHE"] = str(_SESSION_HOME / "hub_dfq")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402

pytest_plugins = ["hub_server"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread (results that depend on reduction order stay put)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """The embedded default ResNet-20 (a fresh one per test module: some tests change it)."""
    import hub_dfq

    return hub_dfq.load_model("default")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (reference checkpoints and data) is not present")
    return SHARED


@pytest.fixture(scope="session")
def resnet20_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "cifar10-resnet20"


@pytest.fixture(scope="session")
def resnet44_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "cifar10-resnet44"


@pytest.fixture(scope="session")
def cifar_test_parquet(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cifar10" / "test.parquet"


@pytest.fixture(scope="session")
def cifar_train_parquet(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cifar10" / "train.parquet"
