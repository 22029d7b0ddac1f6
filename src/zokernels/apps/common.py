"""What every training program shares: atomic checkpoints, resumable CSV logs, loss/accuracy plots, evaluation.

Checkpoints hold everything a bit-identical resume needs: model, optimizer, scheduler, step counters and the
RNG states (torch CPU and any generator the program passes)."""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


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
