"""`zokernels ...` console entry point.

    zokernels demo                 a small real example: CGE training on scikit-learn's digits, minutes on CPU
    zokernels info                 backends and build
    zokernels train <program> ...  the application programs in zokernels/apps (see `zokernels train -h`)

Each training program is a module in zokernels/apps exposing `add_arguments(parser)` and `run(args) -> int`;
it is imported only when chosen, so one program's optional dependencies never slow down or break another.
"""
from __future__ import annotations

import argparse
import importlib
import sys

TRAIN_PROGRAMS = {
    "resnet20": ("zokernels.apps.resnet20", "DeepZero: sparse-CGE training of CIFAR ResNets / small CNNs"),
    "lm": ("zokernels.apps.lm", "MeZO / MeZO-SVRG / FO fine-tuning of a local Hugging Face model"),
    "pde": ("zokernels.apps.pde", "solver-in-the-loop PDE error correction through a black-box solver"),
    "defense": ("zokernels.apps.defense", "certified black-box defense: ZO-trained denoiser + smoothing"),
}


def _load_program(name: str):
    module_name, _ = TRAIN_PROGRAMS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise SystemExit(f"zokernels train {name}: not available in this version ({module_name} missing)")
        raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zokernels", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="small real example: CGE on scikit-learn digits")
    from .apps import demo as demo_program

    demo_program.add_arguments(demo)
    commands.add_parser("info", help="print version, torch and backend availability")
    train = commands.add_parser("train", help="run an application program")
    programs = train.add_subparsers(dest="program", required=True)
    for name, (_, help_text) in TRAIN_PROGRAMS.items():
        sub = programs.add_parser(name, help=help_text)
        # Only the chosen program's module is imported (its arguments are needed to parse).
        if len(argv) >= 2 and argv[0] == "train" and argv[1] == name:
            _load_program(name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        info_main()
        return 0
    if args.command == "demo":
        from .apps import demo as demo_program

        return demo_program.run(args)
    return _load_program(args.program).run(args)


if __name__ == "__main__":
    sys.exit(main())
