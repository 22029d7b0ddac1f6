import csv
import json

import pytest
import torch

from zokernels.apps.common import duration, load_checkpoint
from zokernels.apps.resnet20 import PRESETS, coordinate_chunks, resolve_preset
from zokernels.cli import build_parser, main

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
    assert ([r["loss"] for r in _rows(tmp_path / "a" / "steps.csv")]
            == [r["loss"] for r in _rows(tmp_path / "b" / "steps.csv")])


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


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--sparsity"):
        main(SMALL + ["--sparsity", "1.5", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--batch-size"):
        main(SMALL + ["--batch-size", "1000", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--progress-chunk"):
        main(SMALL + ["--progress-chunk", "0", "--out", str(tmp_path)])
    # checked before ZO-GraSP runs: a bad --batch-size writes no ratios cache
    assert list(tmp_path.iterdir()) == []


def test_chunked_steps_match_one_call_and_resume_bit_identically(tmp_path):
    """--progress-chunk splits a step's CGE into chunks: the same estimate (on this tiny CNN the engine's pass width
    exceeds the split pieces, so the last bits may differ; see coordinate_chunks), and a chunked run resumes bit
    for bit."""
    one = _run(tmp_path / "one", "--max-steps", "3")
    chunked = _run(tmp_path / "chunked", "--max-steps", "3", "--progress-chunk", "50")
    assert sum(int(m.sum()) for m in one["masks"].values()) > 50  # really chunked
    for key, value in one["model"].items():
        assert torch.allclose(value, chunked["model"][key], rtol=1e-5, atol=1e-7), key
    _run(tmp_path / "split", "--max-steps", "2", "--progress-chunk", "50")
    resumed = _run(tmp_path / "split", "--max-steps", "3", "--progress-chunk", "50", "--resume")
    for key, value in chunked["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_whole_parameter_chunks_add_up_to_one_call_bit_for_bit():
    from zokernels import api
    from zokernels.apps.resnet20 import Trainer

    torch.manual_seed(0)
    # at most 4 coordinates per parameter: never split at size 40 (the smallest chunk holds 5)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()) for _ in range(12)],
                                torch.nn.Linear(2, 2))
    batch = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
    api.cge_step(model, batch)
    expected = [p.grad.clone() for p in model.parameters()]
    trainer = Trainer.__new__(Trainer)  # only what _cge reads
    trainer.model, trainer.masks, trainer.ratios, trainer.sharder = model, None, None, None
    trainer.args = build_parser(["train", "resnet20"]).parse_args(["train", "resnet20", "--progress-chunk", "40",
                                                                  "--quiet"])
    trainer.is_main, trainer.chunk_reported, trainer.global_step = True, True, 0
    assert len(coordinate_chunks(model, None, 40)) > 3
    trainer._cge(batch)
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g)


def test_coordinate_chunks_cover_every_coordinate_once():
    model = torch.nn.Sequential(torch.nn.Linear(10, 30), torch.nn.Linear(30, 2))
    masks = {"0.weight": torch.rand(30, 10, generator=torch.Generator().manual_seed(0)) < 0.5,
             "0.bias": torch.ones(30, dtype=torch.bool), "1.weight": torch.ones(2, 30, dtype=torch.bool),
             "1.bias": torch.zeros(2, dtype=torch.bool)}
    chunks = coordinate_chunks(model, masks, 40)
    sizes = [sum(int(m.sum()) for m in c.values()) for c in chunks]
    assert all(n <= limit for n, limit in zip(sizes, [5, 10, 20] + [40] * len(sizes))), sizes
    for name in ("0.weight", "1.weight"):  # more than a chunk: split into pieces of at least half a chunk
        pieces = [n for c, n in zip(chunks, sizes) if set(c) == {name}]
        assert len(pieces) > 1 and all(n >= 40 // 16 for n in pieces), (name, pieces)
    assert sizes[-3:] == [30, 40, 20] and [set(c) for c in chunks[-3:]] == [{"0.bias"}, {"1.weight"}, {"1.weight"}]
    for name, mask in masks.items():
        together = sum((c[name].int() for c in chunks if name in c), torch.zeros_like(mask, dtype=torch.int))
        assert torch.equal(together, mask.int()), name  # every selected coordinate exactly once
    # small parameters are grouped, the first chunks smaller: 5, 10, 20, then 40 coordinates at most
    small = torch.nn.Sequential(*[torch.nn.Linear(3, 1) for _ in range(20)])  # 20 x (3 + 1) coordinates
    sizes = [sum(int(m.sum()) for m in c.values()) for c in coordinate_chunks(small, None, 40)]
    assert sizes[:4] == [4, 8, 20, 40] and sum(sizes) == 80, sizes


def test_ratio_cache_is_keyed_by_every_input(tmp_path, capsys):
    """A change of grasp_q, the probe size, the train limit, mu, the model or the seed gives another cache file;
    the same inputs read the file back; a file at the path with another key is recomputed, not reused."""
    base = ["--max-steps", "1", "--out", str(tmp_path)]
    variants = [[], ["--grasp-q", "9"], ["--grasp-per-class", "4"], ["--train-limit", "90"], ["--mu", "1e-2"],
                ["--depth", "2"], ["--seed", "1"], ["--sparsity", "0.8"], ["--ratios", "fo_grasp"]]
    for extra in variants:
        assert main(SMALL + base + extra) == 0
    files = sorted(tmp_path.glob("lpr_*.json"))
    assert len(files) == len(variants), [f.name for f in files]
    capsys.readouterr()
    assert main(SMALL + base + ["--grasp-q", "9"]) == 0
    assert "read from" in capsys.readouterr().out
    assert len(list(tmp_path.glob("lpr_*.json"))) == len(variants)
    # a file at the expected path whose stored key differs (e.g. written by older code) is not trusted
    target = next(f for f in files if json.loads(f.read_text())["metadata"]["key"].get("grasp_q") == 9)
    data = json.loads(target.read_text())
    data["metadata"]["key"]["format"] = -1
    target.write_text(json.dumps(data))
    assert main(SMALL + base + ["--grasp-q", "9"]) == 0
    assert "recomputing" in capsys.readouterr().out
    assert json.loads(target.read_text())["metadata"]["key"]["format"] != -1


def test_presets_fill_only_what_is_not_given():
    def resolved(*argv):
        parser = build_parser(["train", "resnet20", *argv])
        return resolve_preset(parser.parse_args(["train", "resnet20", *argv]))

    quick = resolved()
    assert (quick.preset, quick.model, quick.epochs, quick.grasp_q) == ("quick", "small_cnn", 20, 192)
    paper = resolved("--preset", "paper")
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.warmup_epochs, paper.sparsity,
            paper.grasp_q, paper.mask_interval) == ("resnet20", 50, 256, 0.1, 3.0, 0.9, 192, 5)
    mixed = resolved("--preset", "paper", "--epochs", "2", "--model", "small_cnn")
    assert (mixed.epochs, mixed.model, mixed.batch_size) == (2, "small_cnn", 256)
    assert PRESETS.keys() == {"quick", "paper"}


def test_cost_is_printed_before_training_and_measured_after_the_first_step(tmp_path, capsys):
    state = _run(tmp_path, "--max-steps", "3")
    out = capsys.readouterr().out
    coordinates = sum(int(m.sum()) for m in state["masks"].values())
    assert f"cost: {coordinates:,} CGE coordinates per step" in out
    assert f"3 steps = {3 * (coordinates + 1):,} queries" in out
    assert "measured: ZO small_cnn step 1 took" in out and "projected 2 more steps" in out
    assert out.index("cost:") < out.index("step 1 took") < out.index("step 2 took") < out.index("done: 3 steps")


@pytest.mark.parametrize("seconds, text", [(4.2, "4.2 s"), (42, "42 s"), (600, "10.0 min"), (6480, "1.8 h"),
                                           (3 * 86400, "3.0 days")])
def test_duration_units(seconds, text):
    assert duration(seconds) == text


def test_mnist_sizes_pad_with_background_or_shrink():
    from zokernels.apps.resnet20_setup import fit_mnist_size

    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    padded = fit_mnist_size(images, 32, background=-0.5)
    assert padded.shape == (2, 3, 32, 32) and torch.equal(padded[..., 2:30, 2:30], images)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((padded[..., border] == -0.5).all())
    assert fit_mnist_size(images, 14, background=-0.5).shape == (2, 3, 14, 14)
    assert fit_mnist_size(images, 28, background=-0.5) is images


def test_mnist_cge_and_fo_share_the_start_and_log_evals(tmp_path):
    """--data mnist (real 28x28 digits, padded to 32): CGE and --fo with one seed start from the same weights, LPR
    and masks (equal step-0 test loss) and log test accuracy every --eval-every steps."""
    mnist = ["--data", "mnist", "--image-size", "32", "--train-limit", "64", "--test-limit", "30", "--max-steps",
             "2", "--eval-every", "1", "--ratios-file", str(tmp_path / "lpr.json")]
    zo, fo = _run(tmp_path / "zo", *mnist), _run(tmp_path / "fo", *mnist, "--fo")
    evals = {m: _rows(tmp_path / m / "evals.csv") for m in ("zo", "fo")}
    assert [int(r["step"]) for r in evals["zo"]] == [0, 1, 2] == [int(r["step"]) for r in evals["fo"]]
    assert evals["zo"][0]["test_loss"] == evals["fo"][0]["test_loss"]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in evals["zo"] + evals["fo"])
    for name, mask in zo["masks"].items():
        assert torch.equal(mask, fo["masks"][name]), name
    assert zo["config"]["data"] == "mnist32"
    with pytest.raises(ValueError, match="--eval-every"):
        main(SMALL + ["--eval-every", "0", "--out", str(tmp_path / "bad")])
