"""What every training program shares: atomic checkpoints, resumable CSV logs, loss/accuracy plots, evaluation.

Checkpoints hold everything a bit-identical resume needs: model, optimizer, scheduler, step counters and the
RNG states (torch CPU and any generator the program passes). `TimedProgress` is the progress every long phase
shows: a tqdm bar with an ETA, plus the measured time of the first steps and the projected rest, printed once."""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def fill_preset(args: Any, presets: dict[str, dict[str, Any]]) -> Any:
    """Fills every preset-controlled option left unset (None) from `presets[args.preset]`, in place: an option the
    user gives always wins over the preset. ValueError naming --preset for an unknown name."""
    if args.preset not in presets:
        raise ValueError(f"--preset must be one of {list(presets)}, got {args.preset!r}")
    for option, value in presets[args.preset].items():
        if getattr(args, option, None) is None:
            setattr(args, option, value)
    return args


def duration(seconds: float) -> str:
    """Seconds in the unit a reader wants: '4.2 s', '42 s', '7.5 min', '1.8 h', '3.2 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class TimedProgress:
    """A tqdm bar (stderr, ETA) over `total` units of a phase, that also prints (stdout) what its first step took
    and what the rest is projected to take, when that projection is at least `min_projection` seconds (a phase of
    seconds needs no forecast). With `first_note` (the first step includes one-time work such as tracing), the
    second, typical step is reported too. `quiet` hides the bar, not the report; `report=False` (e.g. on a
    non-main rank) hides both."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, quiet: bool = False,
                 report: bool = True, first_note: str = "", min_projection: float = 10.0):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=quiet or not report,
                        file=sys.stderr, dynamic_ncols=True)
        self.desc, self.unit, self.report, self.first_note = desc, unit, report, first_note
        self.min_projection = min_projection
        self.done, self.steps, self.total = initial, 0, total
        self.last = time.perf_counter()

    def update(self, n: int = 1, **postfix: Any) -> float:
        """Marks one step of `n` units done; returns its seconds."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.done += n
        self.steps += 1
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(**postfix)
        left = self.total - self.done
        projected = left * seconds / max(n, 1)
        due = self.steps == 1 or (self.steps == 2 and self.first_note)
        if self.report and due and left > 0 and projected >= self.min_projection:
            note = self.first_note if self.steps == 1 else ""
            # tqdm.write keeps the bars intact
            tqdm.write(f"measured: {self.desc} step {self.steps} took {duration(seconds)}{note}; projected "
                       f"{left:,} more {self.unit}{'s' if left > 1 else ''}: ~{duration(projected)}")
        return seconds

    def set_postfix(self, **postfix: Any) -> None:
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "TimedProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_checkpoint_atomic(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Writes to a temporary file in the same folder, fsyncs, then renames: a killed run leaves either the old
    checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    for name, generator in (generators or {}).items():
        state[name] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    for name, generator in (generators or {}).items():
        generator.set_state(state[name])


class CsvLog:
    """Appends one row per call; on resume, rows after the resumed step are dropped so the log stays consistent."""

    def __init__(self, path: str | os.PathLike, fields: list[str], resume_after_step: int | None = None):
        self.path, self.fields = Path(path), fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read() if resume_after_step is not None and self.path.exists() else []
        rows = [r for r in rows if int(float(r["step"])) <= (resume_after_step or 0)]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, **row: Any) -> None:
        missing = set(self.fields) - set(row)
        if missing:
            raise ValueError(f"log row is missing fields {sorted(missing)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def read(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def plot_curves(csv_paths: dict[str, str | os.PathLike], x_field: str, y_fields: list[str],
                out_path: str | os.PathLike, title: str = "") -> Path:
    """One panel per y field, one line per labelled CSV; written as PNG (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(y_fields), figsize=(5 * len(y_fields), 3.6), squeeze=False)
    for label, csv_path in csv_paths.items():
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f)]
        for axis, field in zip(axes[0], y_fields):
            points = [(float(r[x_field]), float(r[field])) for r in rows if r.get(field) not in (None, "")]
            if points:
                axis.plot(*zip(*points), label=label)
            axis.set_xlabel(x_field)
            axis.set_ylabel(field)
    for axis in axes[0]:
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += (model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(y))


def first_order_step(model: torch.nn.Module, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> float:
    """The first-order baseline on the same training loop as the ZO methods: backprop and one optimizer step;
    returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
