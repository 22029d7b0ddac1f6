"""`python -m zokernels.info`: what this install can run, and why the rest cannot."""
from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import PACKAGE_DIR, availability


def build_report() -> str:
    lines = [
        f"zokernels {__version__} (imported from {PACKAGE_DIR})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {platform.python_version()}, "
        f"{torch.get_num_threads()} torch threads",
        "backends:",
    ]
    for status in availability().values():
        mark = "available  " if status.available else "unavailable"
        lines.append(f"  {status.name:<7} {mark} {status.reason}")
    return "\n".join(lines)


def main() -> None:
    print(build_report())


if __name__ == "__main__":
    main()
