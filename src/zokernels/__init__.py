"""zokernels: zeroth-order optimization engine for deep learning (DeepZero CGE, RGE, MeZO / MeZO-SVRG).

cge_step, rge_step and mezo_step(..., update=False) write a gradient estimate into `.grad` and leave the
parameters bit-identical, so any torch.optim optimizer performs the update; mezo_step (update=True, the default)
and ZOSVRG.step update the parameters themselves, as MeZO does, and leave `.grad` alone. A verb that raises
leaves parameters and buffers as they were (mezo_step mode='inplace': parameters up to rounding); its error names
the failing query (see estimators/common.py).

    result = zokernels.cge_step(model, (x, y), mu=5e-3)
    optimizer.step()
"""
from .api import cge_step, rge_step
from .backends import availability
from .engine.explain import explain
from .estimators.common import NonFiniteLossError, StepResult, default_loss
from .estimators.mezo import MeZOWorkspace, mezo_step
from .estimators.stacked import stacked_cge_step
from .optim.model_svrg import ZOSVRG
from . import optim  # zokernels.optim: ZOSGD, ZOAdam, ZOSignSGD, ZOConservative, FZOO, HiZOO, LeZO

__version__ = "0.1.0"

__all__ = ["cge_step", "rge_step", "mezo_step", "stacked_cge_step", "MeZOWorkspace", "ZOSVRG", "availability",
           "explain", "NonFiniteLossError", "StepResult", "default_loss", "__version__"]
