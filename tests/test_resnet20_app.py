import csv

import pytest
import torch

from zokernels.apps.common import load_checkpoint
from zokernels.cli import main

SMALL = ["train", "resnet20", "--model", "small_cnn", "--depth", "1", "--train-limit", "96", "--test-limit", "40",
         "--batch-size", "32", "--epochs", "3", "--mask-interval", "2", "--warmup-epochs", "1", "--grasp-q", "8",
         "--grasp-per-class", "3", "--quiet"]


def _run(out, *extra):
    assert main(SMALL + ["--out", str(out), *extra]) == 0
    return load_checkpoint(out / "checkpoint.pt")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_is_bit_identical(tmp_path):
    """4 steps, stop (mid-epoch 2), resume to 7 steps == 7 steps straight: model, optimizer, masks and logs."""
    straight = _run(tmp_path / "a", "--max-steps", "7")
    first = _run(tmp_path / "b", "--max-steps", "4")
    assert first["global_step"] == 4 and first["step_in_epoch"] == 1
    resumed = _run(tmp_path / "b", "--max-steps", "7", "--resume")
    assert resumed["global_step"] == 7
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for name, mask in straight["masks"].items():
        assert torch.equal(mask, resumed["masks"][name]), name
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, resumed["optimizer"]["state"].values()))
    assert [r["loss"] for r in _rows(tmp_path / "a" / "steps.csv")] == \
           [r["loss"] for r in _rows(tmp_path / "b" / "steps.csv")]


def test_zo_run_logs_masks_ratios_cache_and_plot(tmp_path, capsys):
    state = _run(tmp_path, "--plot")
    epochs = _rows(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in epochs)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    masks, ratios = state["masks"], state["ratios"]
    weight = state["model"]["0.weight"]
    assert int(masks["0.weight"].sum()) == round((1 - ratios["0.weight"]) * weight.numel())
    assert bool(masks["1.weight"].all()) and bool(masks["0.bias"].all())  # BN and bias always estimated
    steps = _rows(tmp_path / "steps.csv")
    assert len(steps) == 9 and len({r["coordinates"] for r in steps}) == 1
    _run(tmp_path / "again", "--ratios-file", str(next(tmp_path.glob("lpr_*.json"))), "--max-steps", "1")
    assert "read from" in capsys.readouterr().out


def test_fo_baseline_and_sparse_decay_flag(tmp_path):
    state = _run(tmp_path / "fo", "--fo", "--ratios", "smart", "--max-steps", "2", "--no-decay-unmasked",
                 "--lr", "0.5")
    init = _run(tmp_path / "init", "--fo", "--ratios", "smart", "--max-steps", "1", "--lr", "0.0")
    unmasked = ~state["masks"]["0.weight"]
    # with decay restricted to the mask and gradients masked, unselected weights never move
    assert torch.equal(state["model"]["0.weight"][unmasked], init["model"]["0.weight"][unmasked])
    assert not torch.equal(state["model"]["0.weight"], init["model"]["0.weight"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="--sparsity"):
        main(SMALL + ["--sparsity", "1.5"])
    with pytest.raises(ValueError, match="--batch-size"):
        main(SMALL + ["--batch-size", "1000"])
