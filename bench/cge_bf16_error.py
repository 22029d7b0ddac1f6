"""The issue's optional bf16 mode, measured: the engine (delta mode) with every convolution on a dense δ run in
bf16 (AVX-512 BF16 here: ~2x the fp32 conv throughput), against the float64 naive oracle, next to the fp32 engine
and the fp32 naive difference, on sampled ResNet-20 coordinates (batch 64). The mode is kept only if its error is
at most the fp32 naive error (issue 3); it is not (see docs/engine.md).

    .venv/bin/python bench/cge_bf16_error.py"""
import copy

import torch
import torch.nn.functional as F
import zokernels
from zokernels.engine import delta as rules
from zokernels.models import resnet20
from zokernels.reference import cge_ref

from benchlib import append_csv_rows, run_metadata

torch.manual_seed(0); torch.set_num_threads(2)
model = resnet20().train()
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
g = torch.Generator().manual_seed(5)
mask = {n: torch.rand(p.shape, generator=g) < 3e-4 for n, p in model.named_parameters()}
for n in ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight", "layer3.1.conv1.weight"):
    mask[n].view(-1)[:3] = True
oracle = cge_ref(copy.deepcopy(model).double(), (x.double(), y), mu=5e-3, mask=mask)
naive = cge_ref(model, (x, y), mu=5e-3, mask=mask)
def err(est):
    return max((est[n].double() - oracle[n])[mask[n]].abs().max().item() for n in mask if mask[n].any())
def grads():
    return {n: p.grad.clone() for n, p in model.named_parameters()}
zokernels.cge_step(model, (x, y), mu=5e-3, mask=mask, update_running_stats=False)
fp32 = grads()
original = rules.conv_channels_last
def bf16_conv(t, conv, weight, bias, geometry):
    out = conv(t.contiguous(memory_format=torch.channels_last).bfloat16(),
               weight.contiguous(memory_format=torch.channels_last).bfloat16(), None,
               geometry["stride"], geometry["padding"], geometry["dilation"], geometry["groups"]).float()
    return out + bias.view(1, -1, 1, 1) if bias is not None else out
rules.conv_channels_last = bf16_conv
zokernels.cge_step(model, (x, y), mu=5e-3, mask=mask, update_running_stats=False)
rules.conv_channels_last = original
bf16 = grads()
scale = max(oracle[n][mask[n]].abs().max().item() for n in mask if mask[n].any())
print(f"coords {sum(int(m.sum()) for m in mask.values())}  max|g| {scale:.3g}")
print(f"max error vs float64: engine fp32 {err(fp32):.3g}  engine bf16-δ convs {err(bf16):.3g}  naive fp32 {err(naive):.3g}")
append_csv_rows("cge_bf16_error.csv", [{**run_metadata(), "batch": 64, "coordinates": sum(int(m.sum()) for m in mask.values()),
                                         "max_abs_grad": f"{scale:.3g}", "engine_fp32_err": f"{err(fp32):.3g}",
                                         "engine_bf16_conv_err": f"{err(bf16):.3g}", "naive_fp32_err": f"{err(naive):.3g}"}])
