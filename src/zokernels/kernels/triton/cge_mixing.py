"""The next mixing op on one-channel deltas (Triton): replica k's δ lives in input channel o_k only, so the conv
reads one input channel and the weight slice W[:, o_k] — a 1 → C2 convolution per (replica, sample), written
straight into [K·B, C2, H2, W2] for the dense tail. Linear: out[k·B + b, :] = δ[k, b] · W[:, c_k].

Each program owns a tile of BLOCK_P output positions × BLOCK_C output channels of one (k, b) row and sums the
kernel taps in (i, j) order as outer products of a δ column and a weight row."""
import triton
import triton.language as tl


@triton.jit
def _one_channel_conv2d_kernel(d_ptr, ch_ptr, w_ptr, out_ptr, batch, c_out, h_in, w_in, h_out, w_out,
                               sdk, sdb, sdh, sdw, swo, swi, swh, sww, sob, soc, soh, sow,
                               kh_size, kw_size, st_h, st_w, pad_h, pad_w, dil_h, dil_w,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # k·B + b
    k = row // batch
    b = row - k * batch
    o = tl.load(ch_ptr + k)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < h_out * w_out
    c_mask = co < c_out
    oh = p // w_out
    ow = p - oh * w_out
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=w_ptr.dtype.element_ty)
    for i in range(kh_size):
        ih = oh * st_h - pad_h + i * dil_h
        for j in range(kw_size):
            iw = ow * st_w - pad_w + j * dil_w
            inside = p_mask & (ih >= 0) & (ih < h_in) & (iw >= 0) & (iw < w_in)
            dv = tl.load(d_ptr + k * sdk + b * sdb + ih * sdh + iw * sdw, mask=inside, other=0.0)
            wv = tl.load(w_ptr + co * swo + o * swi + i * swh + j * sww, mask=c_mask, other=0.0)
            acc += dv[:, None] * wv[None, :]
    out_offsets = row * sob + co[None, :] * soc + oh[:, None] * soh + ow[:, None] * sow
    tl.store(out_ptr + out_offsets, acc, mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _one_channel_linear_kernel(d_ptr, ch_ptr, w_ptr, out_ptr, batch, n_out, swo, swi,
                               BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    c = tl.load(ch_ptr + k)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    co = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    b_mask = b < batch
    c_mask = co < n_out
    dv = tl.load(d_ptr + k * batch + b, mask=b_mask, other=0.0)
    wv = tl.load(w_ptr + co * swo + c * swi, mask=c_mask, other=0.0)
    rows = k * batch + b
    tl.store(out_ptr + rows[:, None] * n_out + co[None, :], dv[:, None] * wv[None, :],
             mask=b_mask[:, None] & c_mask[None, :])


def one_channel_conv2d_triton(delta, channels, weight, out, geometry, block_p: int = 64,
                              block_c: int = 16) -> None:
    """delta [K, B, H, W] (dense strides), channels [K] int64, weight [C2, C1, kh, kw], out [K·B, C2, H2, W2]
    (contiguous or channels-last); checked by zokernels.kernels.mixing."""
    (st_h, st_w), (pad_h, pad_w), (dil_h, dil_w) = geometry
    k, batch, h_in, w_in = delta.shape
    c_out, h_out, w_out = out.shape[1:]
    grid = (k * batch, triton.cdiv(h_out * w_out, block_p), triton.cdiv(c_out, block_c))
    _one_channel_conv2d_kernel[grid](delta, channels, weight, out, batch, c_out, h_in, w_in, h_out, w_out,
                                     *delta.stride(), *weight.stride(), *out.stride(), weight.shape[2],
                                     weight.shape[3], st_h, st_w, pad_h, pad_w, dil_h, dil_w,
                                     BLOCK_P=block_p, BLOCK_C=block_c)


def one_channel_linear_triton(delta, channels, weight, out, block_b: int = 64, block_c: int = 64) -> None:
    """delta [K, B] contiguous, channels [K] int64, weight [out, in], out [K·B, out] contiguous."""
    k, batch = delta.shape
    n_out = weight.shape[0]
    grid = (k, triton.cdiv(batch, block_b), triton.cdiv(n_out, block_c))
    _one_channel_linear_kernel[grid](delta, channels, weight, out, batch, n_out, *weight.stride(),
                                     BLOCK_B=block_b, BLOCK_C=block_c)
