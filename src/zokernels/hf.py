"""Hugging Face integration: `ZOTrainer`, a `transformers.Trainer` whose training step is a zeroth-order step.

An existing Trainer script switches with one line:

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev)            # before
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev, lr=1e-6)  # after

Everything else is the Trainer's: TrainingArguments, data loading and collation, the learning-rate schedule,
logging and callbacks, evaluation, checkpoint saving and resuming. What the ZO step trains is what requires grad
(a peft LoRA / prefix / (IA)³ model trains its adapter only), narrowed further by `param_filter`.

The verbs themselves need nothing from this module: `zokernels.mezo_step(model, batch)` with a Hugging Face dict
batch evaluates `model(**batch).loss` (estimators/batching.py), on any `PreTrainedModel` or peft model.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import torch

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("zokernels.hf needs transformers (pip install 'zokernels[lm]')") from error

from .checks import check_choice, check_int, check_mu
from .estimators.mezo import MODES, MeZOWorkspace, mezo_step, select_parameters

ZO_METHODS = ("mezo",)


def step_seed(base_seed: int, global_step: int, purpose: str = "directions") -> int:
    """The Philox seed (purpose 'directions') or the seed of the forwards' randomness (purpose 'forward') of
    optimizer step `global_step` in a run seeded with `base_seed`: a function of the two only, so a run resumed
    from a checkpoint at step k draws exactly what the uninterrupted run drew from step k on."""
    digest = hashlib.blake2b(f"zokernels.hf:{purpose}:{int(base_seed)}:{int(global_step)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # < 2**62


class ScheduleOnlyOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer steps: it holds the learning rate that the Trainer's scheduler anneals (and
    checkpoints), and its `step()` changes nothing. The ZO step has already updated the parameters inside
    `training_step`, and writes no `.grad`."""

    def __init__(self, params: Any, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        return None


class ZOTrainer(Trainer):
    """A `transformers.Trainer` whose `training_step` performs one MeZO step (zokernels.mezo_step) instead of a
    backward pass. Constructor: the Trainer's own arguments, plus the ZO step's (keyword-only):

    - lr: the ZO learning rate at the schedule's peak; None takes `TrainingArguments.learning_rate`. It follows the
      Trainer's scheduler (warm-up, linear/cosine decay...) and is what the logs report as `learning_rate`.
    - mu (perturbation scale), q (directions per step), mode ('exact': θ never written during the queries, bit-exact
      restore, 2 extra parameter copies; 'inplace': MeZO's memory), param_filter (None/'all', 'bias', 'norm',
      'bias_norm' or a callable (name, param) -> bool, applied to the parameters that require grad), backend.
    - check_replicas_every: under torch.distributed (torchrun), compare the ranks' parameter fingerprints after
      every that many steps (0: never); see zokernels.distributed.DataParallelZO.

    How the Trainer's own optimizer is kept from touching the parameters: `create_optimizer` builds a
    ScheduleOnlyOptimizer, whose `step()` is a no-op and whose param group carries the learning rate the scheduler
    anneals; `training_step` reads that rate, performs the ZO update itself and returns the loss. The alternative,
    writing the ZO estimate into `.grad` and letting an SGD optimizer step, would cost a gradient-sized buffer
    (MeZO's point is to have none) and lose the exact mode's single rounding of the update. So the update is the
    ZO step's, and nothing else writes the parameters: `optim`, `weight_decay`, `max_grad_norm` (no gradients to
    clip; the logged `grad_norm` is dropped) and passing `optimizers=(optimizer, ...)` do not apply — a scheduler
    may still be passed as `optimizers=(None, scheduler)`.

    Randomness: step k's Philox seed and the seed of its forwards' randomness (dropout, drawn identically in every
    query of the step) are functions of (TrainingArguments.seed, k) only — `step_seed` — so resuming from a
    checkpoint continues exactly as the uninterrupted run, and under torchrun every rank draws the same directions.

    Loss: the Trainer's `compute_loss(model, inputs)` (the model's `outputs.loss`, label smoothing or
    `compute_loss_func` as configured; a subclass's override is honoured) evaluated under torch.no_grad.
    Gradient accumulation: the micro-batches of one optimizer step are collected and the step's loss is their mean
    (equal weights), so one ZO step sees all of them; the first micro-batches return a loss of 0 and the last the
    step's loss, so the logged loss is the step's. The reported loss is MeZO's (ℓ⁺ + ℓ⁻)/2, the loss at θ up to
    O(μ²).

    Distributed (torchrun, gloo on CPU / NCCL on GPU): each rank gets its shard of the data from the Trainer's
    sampler, the loss of every query is combined over the ranks (only loss scalars are exchanged:
    zokernels.distributed.ShardedLoss), every rank applies the identical update, and the replicas are checked.
    """

    def __init__(self, *args: Any, lr: float | None = None, mu: float = 1e-3, q: int = 1, mode: str = "exact",
                 param_filter: Any = None, zo_method: str = "mezo", backend: str | None = None,
                 check_replicas_every: int = 1, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers is not None and optimizers[0] is not None:
            raise ValueError("ZOTrainer performs the update itself; pass no optimizer (a scheduler may be passed as "
                             "optimizers=(None, scheduler))")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("ZOTrainer performs the update itself; optimizer_cls_and_kwargs does not apply")
        check_choice("zo_method", zo_method, ZO_METHODS)
        check_choice("mode", mode, MODES)
        self.zo_mu, self.zo_q, self.zo_mode = check_mu(mu), check_int("q", q), mode
        self.zo_param_filter, self.zo_backend, self.zo_method = param_filter, backend, zo_method
        self.check_replicas_every = check_int("check_replicas_every", check_replicas_every, 0)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0
                               or math.isinf(lr)):
            raise ValueError(f"lr must be a finite float >= 0 or None, got {lr!r}")
        self.zo_lr = lr
        self._zo_workspace = MeZOWorkspace()  # the exact mode's scratch copies, allocated once for the run
        self._zo_pending: list[Any] = []
        self._zo_grads: list[float] = []
        self._zo_parallel = None
        super().__init__(*args, **kwargs)
        if self.args.weight_decay:
            warnings.warn(f"ZOTrainer applies no weight decay (TrainingArguments.weight_decay="
                          f"{self.args.weight_decay} is ignored)", stacklevel=2)

    # ---- the optimizer the Trainer steps: a learning-rate holder -----------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [p for _, p in select_parameters(opt_model, self.zo_param_filter)]
            lr = self.args.learning_rate if self.zo_lr is None else self.zo_lr
            self.optimizer = ScheduleOnlyOptimizer(params, lr)
        return self.optimizer

    # ---- the ZO step ---------------------------------------------------------------------------------------------
    def zo_loss(self, model: torch.nn.Module, batches: list[Any]) -> float:
        """Mean over the step's micro-batches of the Trainer's `compute_loss` (each gets its own dict: compute_loss
        may pop 'labels')."""
        values = []
        with self.compute_loss_context_manager():
            for inputs in batches:
                loss = self.compute_loss(model, dict(inputs))
                values.append(float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss))
        return sum(values) / len(values)

    def _data_parallel(self):
        if self._zo_parallel is None:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                from .distributed import DataParallelZO
                self._zo_parallel = DataParallelZO(check_every=self.check_replicas_every)
            else:
                self._zo_parallel = False
        return self._zo_parallel or None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """One ZO step on `inputs` (with the step's earlier micro-batches under gradient accumulation); returns the
        loss for the Trainer's logging. No backward pass, no `.grad`."""
        model.train()
        self._zo_pending.append(self._prepare_inputs(inputs))
        device = self.args.device
        if not self.accelerator.sync_gradients:  # not the last micro-batch of this optimizer step
            return torch.zeros((), device=device)
        batches, self._zo_pending = self._zo_pending, []
        step = self.state.global_step
        zo_model = self.accelerator.unwrap_model(model)
        lr = self._get_learning_rate()
        kwargs = dict(mu=self.zo_mu, lr=lr, seed=step_seed(self.args.seed, step), q=self.zo_q,
                      param_filter=self.zo_param_filter, mode=self.zo_mode, backend=self.zo_backend,
                      workspace=self._zo_workspace)
        cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(step_seed(self.args.seed, step, "forward"))
            parallel = self._data_parallel()
            if parallel is not None:
                result = parallel.mezo_step(zo_model, batches, self.zo_loss, **kwargs)
            else:
                result = mezo_step(zo_model, batches, self.zo_loss, **kwargs)
        self._zo_grads.extend(result.projected_grads)
        return torch.tensor(result.loss, dtype=torch.float32, device=device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs, with `projected_grad` (mean |g| of the ZO steps since the last log) instead of the
        meaningless `grad_norm` (there are no gradients)."""
        logs.pop("grad_norm", None)
        if "loss" in logs and self._zo_grads:
            logs["projected_grad"] = sum(abs(g) for g in self._zo_grads) / len(self._zo_grads)
            self._zo_grads = []
        super().log(logs, *args, **kwargs)
