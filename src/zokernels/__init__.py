"""zokernels: zeroth-order optimization engine for deep learning (DeepZero CGE, RGE, MeZO / MeZO-SVRG).

Estimators write into `param.grad`, so any torch.optim optimizer performs the update:

    result = zokernels.cge_step(model, (x, y), mu=5e-3)
    optimizer.step()
"""
from .api import cge_step, rge_step
from .backends import availability
from .engine.explain import explain
from .estimators.common import NonFiniteLossError, StepResult, default_loss
from .estimators.mezo import mezo_step
from .estimators.svrg import ZOSVRG

__version__ = "0.1.0"

__all__ = ["cge_step", "rge_step", "mezo_step", "ZOSVRG", "availability", "explain", "NonFiniteLossError", "StepResult",
           "default_loss", "__version__"]
