"""Shared fixtures. Test media live in ``../shared/data`` beside the checkout (never needed at run time)."""

from __future__ import annotations

import os
from pathlib import Path

# Tests share 2 cores with other work: one OpenMP thread (set before torch loads its pool), as dh-run's
# and dh-train's thread policy would choose on a busy machine (dheads.engine.threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DHEADS_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip with a reason where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"test media not found at {path} (set DHEADS_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    path = SHARED / "reference"
    if not path.is_dir():
        pytest.skip(f"reference layouts not found at {path} (set DHEADS_SHARED)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Caches (the Whisper silence rows) go to a fresh folder, not the user's ~/.cache."""
    os.environ["DHEADS_CACHE"] = str(tmp_path_factory.mktemp("dheads-cache"))
    yield


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    wants_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "slow" in item.keywords and not wants_slow:
            item.add_marker(pytest.mark.skip(reason="slow (minutes on 2 busy cores): run with -m slow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT; `import tensorrt` failed"))
