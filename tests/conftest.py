"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit runs (set later, launches fail with
"0 active drivers"), so it is set here, before test modules import kernel code, unless a GPU run asked for the
real compiler."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ZOKERNELS_TEST_GPU") == "1" else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# Test tensors are tiny: one intra-op thread avoids thread wake-ups that cost more than the work, and keeps
# timings sane when the machine is shared. Tests that check thread independence set threads explicitly.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _working_directory_outside_the_checkout(tmp_path_factory, monkeypatch):
    """Programs write to relative default paths (`runs/...`): every test runs in a fresh temporary directory, so a
    test that forgets an --out writes there and never into the checkout (`git status` stays clean after the
    suite). Its own tmp_path is a different folder, so tests can still assert what they wrote there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
