"""The build and import contract: `_C` is real and used; without it everything still works on torch."""
import subprocess
import sys

import torch

import zokernels
from zokernels import backends

from helpers import classification_batch, tiny_mlp


def _run_python(args: list[str], cwd) -> subprocess.CompletedProcess:
    # cwd outside the checkout: the installed package must be imported, not the source tree.
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_info_lists_every_backend_with_a_reason(tmp_path):
    out = _run_python(["-m", "zokernels.info"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"zokernels {zokernels.__version__}" in out.stdout and f"torch {torch.__version__}" in out.stdout
    for name, status in backends.availability().items():
        line = next(l for l in out.stdout.splitlines() if l.strip().startswith(name + " "))
        # the thread count in the reason depends on the process (tests run with one thread)
        assert ("unavailable" in line) != status.available and status.reason.split(",")[0] in line


def test_compiled_module_is_used_on_cpu():
    assert backends.availability()["cpu"].available, backends.availability()["cpu"].reason
    result = zokernels.rge_step(tiny_mlp(), classification_batch(), q=2, seed=3)
    assert result.backend == "cpu"


def test_import_and_estimate_without_compiled_module(tmp_path):
    code = (
        "import sys; sys.modules['zokernels._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, zokernels\n"
        "from zokernels.backends import availability\n"
        "s = availability()['cpu']; assert not s.available and 'could not be imported' in s.reason, s\n"
        "m = torch.nn.Linear(3, 2); x = torch.randn(4, 3); y = torch.tensor([0, 1, 1, 0])\n"
        "r = zokernels.rge_step(m, (x, y), q=2, seed=1); assert r.backend == 'torch', r\n"
        "print('ok', r.backend)\n"
    )
    out = _run_python(["-c", code], tmp_path)
    assert out.returncode == 0 and "ok torch" in out.stdout, out.stderr


def test_cli_info_and_demo_smoke():
    from zokernels.cli import main

    assert main(["info"]) == 0
    assert main(["demo", "--max-steps", "2", "--methods", "cge,rge,fo", "--hidden", "4"]) == 0
