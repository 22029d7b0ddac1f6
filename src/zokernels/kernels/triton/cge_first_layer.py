"""Fused first-layer perturb-and-forward (Triton): for K coordinates (o_k, c_k, kh_k, kw_k) of one conv2d (or
linear) weight, the change of output channel o_k after BN and ReLU, in one launch with one program per replica.

Per replica k, with δ = h_k · x[b, c_k, oh·s − p + kh_k·d, ow·s − p + kw_k·d] (zero outside x):
  BN train: the engine's exact rule (zokernels/engine/delta.py, batchnorm_train_delta): c = y − mean, r = root,
            δm = mean(δ), δvar = 2·mean(c·δ) + max(mean(δ²) − δm², 0), r' = sqrt(r² + δvar),
            δz = γ·(δ/r' − c·δvar/(r r' (r + r')) − δm/r'),  z = γ·c/r + β
  BN eval:  δz = scale·δ, z = scale·(y − mean) + β (scale = γ/sqrt(running_var + eps))
  none:     δz = δ, z = y
  ReLU:     out = max(δz, −z) + min(z, 0) (engine's relu_delta), else out = δz.
The statistics need all of replica k's δ before any output, so a program sweeps its B·H'·W' twice (reduce,
then write); δ is recomputed from x in the second sweep rather than stored.
"""
import triton
import triton.language as tl

BN_NONE, BN_TRAIN, BN_EVAL = 0, 1, 2


@triton.jit
def _seed_and_base(x_ptr, y_ptr, n, o, c, kh, kw, h, mask, hw_out, w_out, h_in, w_in,
                   sxb, sxc, sxh, sxw, syb, syc, syh, syw, st_h, st_w, pad_h, pad_w, dil_h, dil_w):
    """δ and base y at flat output positions n (b, oh, ow) of channel o."""
    b = n // hw_out
    rem = n - b * hw_out
    oh = rem // w_out
    ow = rem - oh * w_out
    ih = oh * st_h - pad_h + kh * dil_h
    iw = ow * st_w - pad_w + kw * dil_w
    inside = mask & (ih >= 0) & (ih < h_in) & (iw >= 0) & (iw < w_in)
    xv = tl.load(x_ptr + b * sxb + c * sxc + ih * sxh + iw * sxw, mask=inside, other=0.0)
    yv = tl.load(y_ptr + b * syb + o * syc + oh * syh + ow * syw, mask=mask, other=0.0)
    return xv * h, yv


@triton.jit
def _train_coefficients(x_ptr, y_ptr, n_total, o, c, kh, kw, h, mean, root, gamma, hw_out, w_out, h_in, w_in,
                        sxb, sxc, sxh, sxw, syb, syc, syh, syw, st_h, st_w, pad_h, pad_w, dil_h, dil_w,
                        BLOCK: tl.constexpr):
    """Sweep 1 (BN train): the replica's δ statistics -> (a, b, e) with δz = a·δ + b·(y − mean) + e."""
    offs = tl.arange(0, BLOCK)
    sum_d = tl.zeros([BLOCK], dtype=h.dtype)
    sum_cd = tl.zeros([BLOCK], dtype=h.dtype)
    sum_dd = tl.zeros([BLOCK], dtype=h.dtype)
    for start in range(0, n_total, BLOCK):
        n = start + offs
        mask = n < n_total
        d, yv = _seed_and_base(x_ptr, y_ptr, n, o, c, kh, kw, h, mask, hw_out, w_out, h_in, w_in,
                               sxb, sxc, sxh, sxw, syb, syc, syh, syw, st_h, st_w, pad_h, pad_w, dil_h, dil_w)
        sum_d += d
        sum_cd += tl.where(mask, yv - mean, 0.0) * d
        sum_dd += d * d
    d_mean = tl.sum(sum_d, axis=0) / n_total
    spread = tl.maximum(tl.sum(sum_dd, axis=0) / n_total - d_mean * d_mean, 0.0)
    d_var = 2 * (tl.sum(sum_cd, axis=0) / n_total) + spread
    new_root = tl.sqrt(root * root + d_var)
    a_coef = gamma * (1 / new_root)
    b_coef = gamma * (-d_var / (root * new_root * (root + new_root)))
    e_coef = gamma * (-d_mean / new_root)
    return a_coef, b_coef, e_coef


@triton.jit
def _first_layer_delta_kernel(x_ptr, y_ptr, coord_ptr, step_ptr, chan_ptr, out_ptr, n_total, n_channels,
                              hw_out, w_out, h_in, w_in, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                              st_h, st_w, pad_h, pad_w, dil_h, dil_w,
                              BN_MODE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    o = tl.load(coord_ptr + 4 * k)
    c = tl.load(coord_ptr + 4 * k + 1)
    kh = tl.load(coord_ptr + 4 * k + 2)
    kw = tl.load(coord_ptr + 4 * k + 3)
    h = tl.load(step_ptr + k)
    # chan rows: 0 mean, 1 root (train) or scale (eval), 2 gamma, 3 beta
    mean = tl.load(chan_ptr + o)
    root = tl.load(chan_ptr + n_channels + o)
    gamma = tl.load(chan_ptr + 2 * n_channels + o)
    beta = tl.load(chan_ptr + 3 * n_channels + o)
    if BN_MODE == 1:
        a_coef, b_coef, e_coef = _train_coefficients(
            x_ptr, y_ptr, n_total, o, c, kh, kw, h, mean, root, gamma, hw_out, w_out, h_in, w_in,
            sxb, sxc, sxh, sxw, syb, syc, syh, syw, st_h, st_w, pad_h, pad_w, dil_h, dil_w, BLOCK)
    for start in range(0, n_total, BLOCK):  # sweep 2: recompute δ (cheaper than storing it), write the output
        n = start + tl.arange(0, BLOCK)
        mask = n < n_total
        d, yv = _seed_and_base(x_ptr, y_ptr, n, o, c, kh, kw, h, mask, hw_out, w_out, h_in, w_in,
                               sxb, sxc, sxh, sxw, syb, syc, syh, syw, st_h, st_w, pad_h, pad_w, dil_h, dil_w)
        if BN_MODE == 1:
            centered = yv - mean
            dz = d * a_coef + centered * b_coef + e_coef
            z = gamma * (centered / root) + beta
        elif BN_MODE == 2:
            dz = d * root
            z = (yv - mean) * root + beta
        else:
            dz = d
            z = yv
        if RELU:
            dz = tl.maximum(dz, -z) + tl.minimum(z, 0.0)
        tl.store(out_ptr + k * n_total + n, dz, mask=mask)


def first_layer_delta_triton(x, y, coords, steps, chan, out, geometry, bn_mode: int, relu: bool,
                             block: int = 1024) -> None:
    """Launches one program per coordinate. Arguments are checked by zokernels.kernels.cge.first_layer_delta:
    x [B, C_in, H, W], y [B, C_out, H', W'] (any dense strides), coords [K, 4] int64, steps [K], chan [4, C_out],
    out [K, B, H', W'] contiguous; geometry = (stride, padding, dilation) pairs."""
    (st_h, st_w), (pad_h, pad_w), (dil_h, dil_w) = geometry
    n_total = y.shape[0] * y.shape[2] * y.shape[3]
    _first_layer_delta_kernel[(coords.shape[0],)](
        x, y, coords, steps, chan, out, n_total, y.shape[1], y.shape[2] * y.shape[3], y.shape[3],
        x.shape[2], x.shape[3], *x.stride(), *y.stride(), st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        BN_MODE=bn_mode, RELU=relu, BLOCK=block)
