"""zokernels.optim: the zeroth-order optimizers practitioners compare, as torch.optim optimizers with `step(closure)`.

    opt = zokernels.optim.ZOAdam(model.parameters(), lr=1e-3, mu=1e-3)
    def closure():
        return loss_fn(model(x), y)          # the loss at the current parameters; no backward
    loss = opt.step(closure)

Directions are Philox streams regenerated from (seed, step, direction), never stored; parameters are perturbed in
place and restored bit for bit; a closure that raises or returns NaN leaves parameters, optimizer state and the RNG
bit-identical. Design, memory per optimizer and how to add an update rule: docs/estimators.md.
"""
from .core import StepInfo, ZOOptimizer, direction_stream
from .optimizers import FZOO, LeZO, HiZOO, ZOAdam, ZOConservative, ZOSGD, ZOSignSGD
from .rules import AdamRule, SGDRule, SignRule, UpdateRule
from .svrg import ZOSVRG

__all__ = ["ZOSGD", "ZOAdam", "ZOSignSGD", "ZOConservative", "FZOO", "HiZOO", "LeZO", "ZOSVRG", "ZOOptimizer", "StepInfo",
           "UpdateRule", "SGDRule", "SignRule", "AdamRule", "direction_stream"]
