"""
Fused gated CLIP loss: ALIP's symmetric, per-sample-weighted InfoNCE loss without an n x N matrix.

Math. x, t: this rank's n image and text features (unit norm); x_all, t_all: the N gathered rows, of which
rows offset .. offset+n-1 are this rank's (x_all = x, t_all = t on one GPU); s: the logit scale; w: the gate
weights (a constant); w'_i = w_i / (2n).

    A = s * x @ t_all.T   (n, N)  image -> text          C = s * t @ x_all.T   (n, N)  text -> image
    loss = sum_i w'_i (LSE_j A_ij + LSE_j C_ij - 2 s x_i.t_i)

The positive pair is the local x_i.t_i, so its gradient goes to x and t; x_all and t_all get only the softmax
terms, which an all_gather-with-grad returns to their owners: nothing is counted twice (alip.contrastive_loss does
the same). `offset` is therefore only checked. With P = softmax_row(A), Q = softmax_row(C):

    dx = s (sum_j w'_i P_ij t_all_j - 2 w'_i t_i)          dt_all_j = s sum_i w'_i P_ij x_i
    dt = s (sum_j w'_i Q_ij x_all_j - 2 w'_i x_i)          dx_all_j = s sum_i w'_i Q_ij t_i
    ds = sum_i w'_i (sum_j P_ij A_ij / s + sum_j Q_ij C_ij / s - 2 x_i.t_i)

Square case (no *_all): C = A.T, so LSE_j C_ij is the column LSE of A, one matrix serves both directions, and
with p_ij = w'_i P_ij + w'_j Q_ji both gradients come from it: dx_i = s (sum_j p_ij t_j - 2 w'_i t_i), dt_j =
s (sum_i p_ij x_i - 2 w'_j x_j).

Kernels, of the flash-attention kind: a tile of T = q @ k.T is computed in fp32 in registers, used, and dropped.
A program loads a block of rows once and keeps it (in shared memory) while it sweeps the other side, each of whose
blocks it loads once per tile: the bytes that set the speed of this loss, which is bound by them on an H100
(below), not by its GEMMs.
  _fwd_kernel     program (group, split, set): row blocks group, group + G, ... (G <= 2 per SM), each kept while
                  it meets column blocks split, split + S, ...; an online softmax over them (a real running max,
                  so logits near -s never underflow) gives each row its partial LSE and the softmax's mean of T
                  (d LSE / d s), in row `split` of a workspace; for the square loss the same per column over the
                  group's rows, merged block by block in row `group` of a (G, N) one. Gathered, the two matrices A
                  and C are the two sets of one launch. The programs of split 0 add x_i.t_i.
  _loss_kernel    merges the partials exactly (the LSE of partial LSEs m_p is m + log sum_p exp(m_p - m), as
                  flash-decoding merges its splits; the means weighted by exp(m_p - LSE)) and sums, per program of
                  1024 rows, the loss, its derivative in s and max |w'|; one aten.sum adds the loss's.
  _bwd_kernel     program (owned block, split x chunk of D, set), a role per launch: it owns BLOCK_O rows of one
                  side and sums their gradient, sum_w p_ow w_w, in a (BLOCK_O, DC) fp32 register accumulator while
                  it sweeps its split of the other side. Per tile it recomputes T from the two resident blocks
                  and forms p_ow = c w'_o exp(s T - LSE_o) + c w'_w exp(s T - LSE_w) (either term optional),
                  rounded once to the input dtype for the product. Square: one launch, set 0 owning the rows of x
                  (dx), set 1 those of t (dt, the columns of S): both softmax terms. Gathered: one launch owns the
                  local rows of A and of C (dx, dt), one the gathered rows (dt_all, dx_all). No atomics: every
                  gradient has one owner per split, so the same inputs give the same bits, whatever order the
                  programs run in (torch.use_deterministic_algorithms has nothing to switch).
  _finish_kernel  the local rows' gradients from their fp32 partial sums, added in order: gscale (sum - 2 c w'_o
                  partner_o) (the positive pair, the scale and the cast to the input dtype, fused), and d s.
One forward + backward is 5 launches square and 6 gathered (5 if x_all, t_all need no gradient), PyTorch's
included; D not a multiple of 16 adds a fill and a copy per input, padding them with zero columns (zeros add
nothing to any product) so that every row starts 16-byte aligned and loads vectorise; the gradients are D wide.
D up to 512 is one chunk (padded to a power of two); beyond, two chunks of 512, and a backward program per chunk
of the gradient, each recomputing T.
Why the owned blocks are 64 rows (bf16, D <= 512). The accumulator lives in registers: 64 x 512 fp32 is 128 KiB,
half an SM's register file, 128 of a thread's 255 registers across 8 warps; ptxas holds it beside T, p and the
pipelined loads of 16-row swept blocks (244 registers on Triton 3.9); 32-row swept blocks spill, and so does a
d s summed in the loop, which is why d s comes from the forward's softmax means and the positive pair's term
from _finish_kernel. `python -m kernels.compile_check` proves every config free of spills on Triton 3.6 and 3.9
and checks the registers and shared memory behind each config's programs per SM.

Cost (launch_plan counts it launch by launch; tests/test_kernels.py counts the same in the interpreter). GEMMs
(2 n N D FLOPs each, padding included), D <= 512:
                       forward   backward                                total
  square               1         2 x (recompute T, product)              5    (the floor: 4)
  gathered             2         4 x (recompute T, product)              10   (the floor: 8; 6 without *_all grads)
With two chunks (D > 512) a backward product costs 1 and its recompute 2 (each chunk's program recomputes T).
Bytes: every load of a block counts, reloads that L2 serves included. Forward: each row block once, and every
column block once per row block: sets ceil(n / BM) N D e; backward: per set, every swept block once per owned block
(and chunk): ceil(owned / BO) NC swept D e. At BM = 128 and BO = 64 in bf16 both make 128 GEMM FLOPs a byte,
where 180 would keep the tensor cores busy at the model's L2 bandwidth. At B = 32768, D = 512, bf16: 8.8 GB
forward, 35 GB backward (launch_plan); the plan's model (MODEL: 989 TFLOP/s, L2 5.5 TB/s, HBM 3.35 TB/s, 5 us a
launch) puts it at 8.3 ms against the floor's 4 GEMMs at 4.4 ms. The backward's 32- and 16-row configs run Ampere's mma.sync, not Hopper's wgmma, which the model
does not tell apart.
Extra memory, beyond the inputs and the gradients, of forward + backward (tests/test_kernels.py checks it), with
the forward's S splits and G groups and the backward's splits SP (launch_plan's; G <= 2 x SMs, SP <= 8 and above 1
only where the owned blocks are fewer than the SMs), e the input's bytes per element, Dp = D rounded up to 16:
    saved     8 n + 12 ceil(n / 1024) + e (2 n + 2 N if gathered) Dp (the padded copies, D not a multiple of 16)
    forward   8 sets S n + 8 G N (square only) + 4 n
    backward  8 SP n D (the fp32 sums of dx and dt)
    extra <=  saved + max(forward, backward) + 4 (the loss)
A DDP rank's n = 512 of N = 4096 at D = 512: 16 MiB (8 splits); B = 1,048,576 on a 132-SM H100: 4.0 GiB, the fp32
sums of dx and dt, beside 2 GiB of inputs and 2 GiB of gradients.

Precision. Scores, softmax sums and gradients accumulate in fp32. bf16/fp16 inputs: exact products, fp32 sums; P
is rounded to the input dtype for the product GEMMs, as in flash attention, and each gradient is rounded once to
the input dtype. fp32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's default) -> ieee fp32
GEMMs, "high"/"medium" -> tf32 (what the PyTorch reference does under the same setting), except the backward at D >
512, which runs ieee (no tf32 config fits). d s is the forward's softmax means less the positives, in fp32, from
the unrounded P.
p = w'_i P_ij is about w / (2 n N), which fp16 cannot hold at large n (below half its smallest subnormal, 3e-8,
from about n = N = 4096 on for w = 1); so the kernels take the weights times a power of two c, c max|w'| in
(2^13, 2^14] (c |p| <= 2^15 < 65504), read off the exponent bits of max|w'|, and the gradient scale divided by c:
exact, and p keeps fp16's 11 bits down to 2^-29 of the largest p.
Max error / max |value| against float64 on the same rounded inputs, measured 2026-12-07 on a 2-core CPU (Triton
3.9 interpreter, which computes fp32 GEMMs in ieee): B = 200 square and n = 100 of N = 200, D = 64, s = 100,
weights in [0, 2), seeds 0 and 1:
    fp32  loss 4.7e-8, gradients <= 1.3e-6       bf16  loss 8.6e-8, gradients <= 8.1e-3 (p rounded to bf16, below)
    fp16  loss 6.9e-8, gradients <= 5.7e-4       d s   <= 6.8e-8 in every dtype
The 16-bit gradients carry an error that does not shrink with them: p_ij is rounded before the product GEMM and the
positive term -2 w'_i diag_i is added in fp32 after it, so where a row's softmax and positive term cancel (a
confident positive, P_ii near 1) the error stays at about s w'_i 2^-9 |k| (bf16; 2^-12 for fp16), 0.4% of the
row's gradient scale s w'_i. Folding the positive term into p before the rounding would remove it.
tf32 (GPU only, not measured here): rounding the inputs alone moves the gradients by ~6e-4 and the loss by ~1e-6
relative (B = 2048, D = 512, s = 100, float64 emulation); tests/test_kernels.py::test_tf32 allows 2e-2.
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MAX_D = 1024  # the largest D that kernels.compile_check covers (D beyond 512 is loaded in two chunks)


# --------------------------------------------------------------------------------------------------
# Plain PyTorch reference


def gated_clip_loss_reference(x, t, logit_scale, weight=None, *, x_all=None, t_all=None, offset=0):
    """The loss above, materialising the (n, N) logits. Equals alip.contrastive_loss without *_all.

    16-bit inputs are widened before the products, so the logits are fp32 sums of exact products, as in the
    kernels; under tf32 too, which holds bf16 and fp16 values exactly (fp16's 10 mantissa bits, fp32's exponent)."""
    x_all = x if x_all is None else x_all
    t_all = t if t_all is None else t_all
    acc = torch.promote_types(x.dtype, torch.float32)
    x, t, x_all, t_all = (a.to(acc) for a in (x, t, x_all, t_all))
    logits_xt = logit_scale * x @ t_all.T  # (n, N)
    logits_tx = logit_scale * t @ x_all.T  # (n, N)
    pos = logit_scale * (x * t).sum(-1)  # (n,)
    per_sample = (torch.logsumexp(logits_xt, 1) - pos + torch.logsumexp(logits_tx, 1) - pos) / 2
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


# --------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _chunk(P, rows, row_ok, D, CHUNK: tl.constexpr, DC: tl.constexpr):
    """Columns CHUNK * DC ... of the rows `rows` of a (., D) matrix, zeros outside it: (len(rows), DC)."""
    dims = CHUNK * DC + tl.arange(0, DC)
    return tl.load(P + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _block(P, rows, row_ok, D, NC: tl.constexpr, DC: tl.constexpr):
    """Rows `rows` of a (., D) matrix in NC chunks of DC columns (the second is the first when NC == 1)."""
    b0 = _chunk(P, rows, row_ok, D, 0, DC)
    b1 = b0
    if NC == 2:
        b1 = _chunk(P, rows, row_ok, D, 1, DC)
    return b0, b1


@triton.jit
def _scores(a0, a1, b0, b1, NC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b.T in fp32 over all of D, from blocks that _block loaded."""
    if UPCAST:
        a0, a1, b0, b1 = a0.to(tl.float32), a1.to(tl.float32), b0.to(tl.float32), b1.to(tl.float32)
    s = tl.dot(a0, tl.trans(b0), input_precision=PRECISION)
    if NC == 2:
        s = tl.dot(a1, tl.trans(b1), s, input_precision=PRECISION)
    return s


@triton.jit
def _weights(WEIGHT, rows, ok, n, HAS_WEIGHT: tl.constexpr):
    """w'_i = w_i / (2n) in fp32 for the rows (0 outside), or 1 / (2n) without weights."""
    if HAS_WEIGHT:
        w = tl.load(WEIGHT + rows, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(ok, 1.0, 0.0)
    return w / (2 * n)


@triton.jit
def _p_scale(TOP, count):
    """c, the power of two with c max|w'| in (2^13, 2^14] (1 if every weight is 0), from the `count` partial maxima
    of |w'| at TOP. Exact: the exponent is read from the float's bits, not from an approximate log2."""
    top = tl.zeros([1024], dtype=tl.float32)
    for i in range(0, count, 1024):
        top = tl.maximum(top, tl.load(TOP + i + tl.arange(0, 1024), mask=i + tl.arange(0, 1024) < count, other=0.0))
    top = tl.max(top)
    bits = top.to(tl.int32, bitcast=True)
    ceil_log2 = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    k = tl.minimum(tl.maximum(14 - ceil_log2, -64), 64)
    return tl.where(top > 0, ((k + 127) << 23).to(tl.float32, bitcast=True), 1.0)


@triton.jit
def _fwd_kernel(
    Q0, K0,    # set 0: (M, D) rows and (N, D) columns of S = s q @ k.T (x and t, or x and t_all), contiguous
    Q1, K1,    # set 1: t and x_all, read if the grid has two sets
    PARTNER,   # (M, D) t: the positives x_i.t_i are the rows of Q0 with PARTNER's
    SCALE,     # (1,) fp32, the logit scale s
    ROW_PART,  # (2, sets, splits, M) fp32 out: per split of the column blocks, each row's LSE over its columns and
               # the mean of q_i.k_j under that softmax
    COL_PART,  # (2, groups, N) fp32 out, if COL_LSE: per group of row blocks, the same for each column over its rows
    POS,       # (M,) fp32 out: x_i.t_i
    M, N, D,
    COL_LSE: tl.constexpr, NC: tl.constexpr, DC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program (group, split, set): row blocks group, group + groups, ... each loaded once and kept while it
    # meets column blocks split, split + splits, ...; neighbouring programs meet the same columns at the same time.
    # Beside each LSE the softmax's mean of T = q.k, sum_j P_ij T_ij: d LSE_i / d s, so that d loss / d s needs
    # nothing from the backward
    group, split, st = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    groups, splits = tl.num_programs(0), tl.num_programs(1)
    Q, K = Q0, K0
    if st == 1:
        Q, K = Q1, K1
    scale = tl.load(SCALE)
    row_means = ROW_PART + tl.num_programs(2) * splits * M
    col_means = COL_PART + groups * N
    for rb in range(group, tl.cdiv(M, BLOCK_M), groups):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        q0, q1 = _block(Q, rows, row_ok, D, NC, DC)
        if (st == 0) & (split == 0):
            # in chunks of its own, so that no (BLOCK_M, D) tile but the resident block is live
            pos = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in range(0, D, 64):
                dims = d0 + tl.arange(0, 64)
                ok = row_ok[:, None] & (dims < D)[None, :]
                xq = tl.load(Q + rows[:, None] * D + dims[None, :], mask=ok, other=0.0)
                tp = tl.load(PARTNER + rows[:, None] * D + dims[None, :], mask=ok, other=0.0)
                pos += tl.sum(xq.to(tl.float32) * tp.to(tl.float32), 1)
            tl.store(POS + rows, pos, mask=row_ok)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running row max: logits near -s never underflow
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(logit - m_i)
        y_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(logit - m_i) T
        for cb in range(split, tl.cdiv(N, BLOCK_N), splits):
            cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            k0, k1 = _block(K, cols, col_ok, D, NC, DC)
            t = _scores(q0, q1, k0, k1, NC, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N), 0 on padding
            # padding gets -1e30: exp(-1e30 - m) is 0, and a padded row never computes -inf - -inf = NaN
            a = tl.where(row_ok[:, None] & col_ok[None, :], t * scale, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(a, 1))
            e = tl.exp(a - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(e, 1)
            y_i = y_i * alpha + tl.sum(e * t, 1)
            m_i = m_new
            if COL_LSE:
                # every row block holds a real row, so a real column's sum is >= 1; merged into the group's
                # partials over its earlier row blocks (none before its first)
                c_max = tl.max(a, 0)
                e = tl.exp(a - c_max[None, :])
                c_sum = tl.sum(e, 0)
                c_lse, c_mean = c_max + tl.log(c_sum), tl.sum(e * t, 0) / c_sum
                if rb >= groups:
                    old_lse = tl.load(COL_PART + group * N + cols, mask=col_ok, other=0.0)
                    old_mean = tl.load(col_means + group * N + cols, mask=col_ok, other=0.0)
                    hi = tl.maximum(old_lse, c_lse)
                    w_old, w_new = tl.exp(old_lse - hi), tl.exp(c_lse - hi)
                    c_lse = hi + tl.log(w_old + w_new)
                    c_mean = (w_old * old_mean + w_new * c_mean) / (w_old + w_new)
                tl.store(COL_PART + group * N + cols, c_lse, mask=col_ok)
                tl.store(col_means + group * N + cols, c_mean, mask=col_ok)
        part = (st * splits + split) * M + rows
        tl.store(ROW_PART + part, m_i + tl.log(l_i), mask=row_ok)
        tl.store(row_means + part, y_i / l_i, mask=row_ok)
        if COL_LSE:
            tl.debug_barrier()  # this block's column stores are seen by every thread before the next block reads


@triton.jit
def _merge(PART, MEANS, rows, ok, parts, stride):
    """(LSE, mean) over `parts` partials PART[p * stride + rows] (LSEs) and MEANS[p * stride + rows] (each part's
    softmax mean), merged in order: the LSE of partial LSEs m_p is m + log sum_p exp(m_p - m), the LSE of all their
    terms (as flash-decoding merges its splits); the mean is theirs weighted by exp(m_p - LSE)."""
    m = tl.load(PART + rows, mask=ok, other=0.0)
    l = tl.zeros_like(m) + 1.0
    y = tl.load(MEANS + rows, mask=ok, other=0.0)
    for p in range(1, parts):
        v = tl.load(PART + p * stride + rows, mask=ok, other=0.0)
        hi = tl.maximum(m, v)
        w_old, w_new = tl.exp(m - hi), tl.exp(v - hi)
        l = l * w_old + w_new
        y = y * w_old + w_new * tl.load(MEANS + p * stride + rows, mask=ok, other=0.0)
        m = hi
    return m + tl.log(l), y / l


@triton.jit
def _loss_kernel(
    ROW_PART,  # (2, sets, splits, M) fp32: _fwd_kernel's partial row LSEs and means
    COL_PART,  # (2, groups, M) fp32, read if COL_LSE: its partial column LSEs and means (square: N == M)
    POS,       # (M,) fp32 x_i.t_i
    WEIGHT,    # (M,) gate weights w, any float dtype, read if HAS_WEIGHT
    SCALE,     # (1,) fp32, s
    LSE,       # (2, M) fp32 out: LSE_j A_ij and LSE_j C_ij (square: the row and the column LSE of S)
    STATS,     # (3, programs) fp32 out: per program, over its rows, sum_i w'_i (LSE + LSE - 2 s x_i.t_i) (the loss),
               # sum_i w'_i (mean + mean - 2 x_i.t_i) (its derivative in s) and max_i |w'_i|
    M, splits, groups,
    COL_LSE: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < M
    sets = 1 if COL_LSE else 2
    means = ROW_PART + sets * splits * M
    lse_a, mean_a = _merge(ROW_PART, means, rows, ok, splits, M)
    if COL_LSE:
        lse_c, mean_c = _merge(COL_PART, COL_PART + groups * M, rows, ok, groups, M)
    else:
        lse_c, mean_c = _merge(ROW_PART + splits * M, means + splits * M, rows, ok, splits, M)
    tl.store(LSE + rows, lse_a, mask=ok)
    tl.store(LSE + M + rows, lse_c, mask=ok)
    w = _weights(WEIGHT, rows, ok, M, HAS_WEIGHT)
    pos = tl.load(POS + rows, mask=ok, other=0.0)
    tl.store(STATS + pid, tl.sum(tl.where(ok, w * (lse_a + lse_c - 2 * tl.load(SCALE) * pos), 0.0)))
    tl.store(STATS + programs + pid, tl.sum(tl.where(ok, w * (mean_a + mean_c - 2 * pos), 0.0)))
    tl.store(STATS + 2 * programs + pid, tl.max(tl.abs(w)))


@triton.jit
def _bwd_kernel(
    O0, W0,    # set 0: (MO, D) rows that a program owns and (MW, D) rows it sweeps, contiguous, one dtype
    LO0, LW0,  # set 0: (MO,) and (MW,) fp32 LSEs of the softmax terms on each side, read if O_TERM / W_TERM
    OUT0,      # set 0: (MO, DG) out: the owned rows' gradient or, if PARTIAL, its fp32 partial sums (splits, MO, DG)
    O1, W1, LO1, LW1, OUT1,  # set 1, the same, read if the grid has two sets
    WEIGHT,    # (n,) gate weights w of the local rows (the O side if O_TERM, the W side if W_TERM)
    SCALE,     # (1,) fp32, s
    GRAD,      # (1,) fp32, d out / d loss, read unless PARTIAL
    STATS,     # (3, stats_n) fp32 from _loss_kernel; row 2, the partial maxima of |w'|, gives c
    MO, MW, D, DG, n, stats_n,
    O_TERM: tl.constexpr, W_TERM: tl.constexpr, PARTIAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    NC: tl.constexpr, DC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # program (owned block, split x chunk, set): it loads its BLOCK_O owned rows once, keeps them while it sweeps
    # its split of the other side's blocks, each loaded once, and sums the owned rows' gradient for one chunk of
    # DC columns in registers. T = o @ w.T, p_ow = c w'_o exp(s T - LO_o) + c w'_w exp(s T - LW_w) (either term
    # optional), and the owned rows get sum_w p_ow w_w: the rows of S and their softmax for one role, the columns
    # and theirs (q and k swapped) for the other.
    ob, split_chunk, st = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1) // NC
    split, chunk = split_chunk // NC, split_chunk % NC
    O, W, LO, LW, OUT = O0, W0, LO0, LW0, OUT0
    if st == 1:
        O, W, LO, LW, OUT = O1, W1, LO1, LW1, OUT1
    c = _p_scale(STATS + 2 * stats_n, stats_n)
    scale = tl.load(SCALE)
    rows_o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = rows_o < MO
    o0, o1 = _block(O, rows_o, o_ok, D, NC, DC)
    if O_TERM:
        w_o = c * _weights(WEIGHT, rows_o, o_ok, n, HAS_WEIGHT)
        l_o = tl.load(LO + rows_o, mask=o_ok, other=0.0)
    acc = tl.zeros([BLOCK_O, DC], dtype=tl.float32)
    for wb in range(split, tl.cdiv(MW, BLOCK_W), splits):
        rows_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        w_ok = rows_w < MW
        w0, w1 = _block(W, rows_w, w_ok, D, NC, DC)
        a = tl.where(o_ok[:, None] & w_ok[None, :], _scores(o0, o1, w0, w1, NC, PRECISION, UPCAST) * scale, -1.0e30)
        # exponents are <= 0 up to rounding (an LSE bounds every logit it holds); padding gives exp = 0
        p = tl.zeros([BLOCK_O, BLOCK_W], dtype=tl.float32)
        if O_TERM:
            p += w_o[:, None] * tl.exp(a - l_o[:, None])
        if W_TERM:
            w_w = c * _weights(WEIGHT, rows_w, w_ok, n, HAS_WEIGHT)
            p += w_w[None, :] * tl.exp(a - tl.load(LW + rows_w, mask=w_ok, other=0.0)[None, :])
        p = p.to(O.dtype.element_ty)
        if UPCAST:
            p, w0, w1 = p.to(tl.float32), w0.to(tl.float32), w1.to(tl.float32)
        if NC == 1:
            acc = tl.dot(p, w0, acc, input_precision=PRECISION)
        elif chunk == 0:
            acc = tl.dot(p, w0, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p, w1, acc, input_precision=PRECISION)
    dims = chunk * DC + tl.arange(0, DC)
    out_ok = o_ok[:, None] & (dims < DG)[None, :]
    if PARTIAL:  # _finish_kernel adds the splits and the positive pair's term
        tl.store(OUT + (split * MO + rows_o[:, None]) * DG + dims[None, :], acc, mask=out_ok)
    else:
        gscale = tl.load(GRAD) * scale / c  # the gradient carries one factor s; c comes back out
        tl.store(OUT + rows_o[:, None] * DG + dims[None, :], (acc * gscale).to(OUT.dtype.element_ty), mask=out_ok)


@triton.jit
def _finish_kernel(
    PART0, OUT0, PARTNER0,  # set 0: (splits, MO, DG) fp32 partial sums, (MO, DG) gradient out, (MO, D) partners
    PART1, OUT1, PARTNER1,  # set 1, the same
    WEIGHT,    # (MO,) gate weights, read if HAS_WEIGHT
    SCALE,     # (1,) fp32, s
    GRAD,      # (1,) fp32, d out / d loss
    STATS,     # (3, stats_n) fp32 from _loss_kernel
    DSCALE,    # (1,) fp32 out, written by program 0: d out / d s
    MO, D, DG, splits, stats_n,
    HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # the gradient of the local rows: gscale (sum of the splits - 2 c w'_o partner_o), cast once to its dtype
    st = tl.program_id(2)
    PART, OUT, PARTNER = PART0, OUT0, PARTNER0
    if st == 1:
        PART, OUT, PARTNER = PART1, OUT1, PARTNER1
    c = _p_scale(STATS + 2 * stats_n, stats_n)
    grad = tl.load(GRAD)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (st == 0):
        ds = tl.zeros([1024], dtype=tl.float32)
        for i in range(0, stats_n, 1024):
            ds += tl.load(STATS + stats_n + i + tl.arange(0, 1024), mask=i + tl.arange(0, 1024) < stats_n, other=0.0)
        tl.store(DSCALE, grad * tl.sum(ds))
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < MO)[:, None] & (cols < DG)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for split in range(splits):  # in order: the same partial sums give the same bits
        acc += tl.load(PART + (split * MO + rows[:, None]) * DG + cols[None, :], mask=ok, other=0.0)
    w = c * _weights(WEIGHT, rows, rows < MO, MO, HAS_WEIGHT)
    acc -= 2 * w[:, None] * tl.load(PARTNER + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * DG + cols[None, :], (acc * (grad * tl.load(SCALE) / c)).to(OUT.dtype.element_ty),
             mask=ok)


# --------------------------------------------------------------------------------------------------
# Launch plan: configs, grids and their modelled cost

# Configs (BLOCK_M, BLOCK_N, num_warps, num_stages) by input kind, "16bit" (bf16, fp16), "tf32" or "ieee" (fp32
# under torch.get_float32_matmul_precision() "high"/"medium" or "highest"), and by the width of the blocks a
# program keeps, NC * DC (up to 256, 512, or two chunks of 512). In the backward BLOCK_M is the owned rows and
# BLOCK_N the swept ones. These are the candidates that `python -m kernels.compile_check` compiles for sm_90 with
# no spill and within an H100 block's 227 KiB of shared memory, on Triton 3.6 and 3.9, for D = 16 .. 1024; the
# plan runs the one its model prices lowest (_schedule), so every process runs the same config: the same bits.
_FWD_CONFIGS = {
    ("16bit", 256): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
    ("16bit", 512): [(128, 32, 8, 2), (64, 64, 8, 2)],
    ("16bit", 1024): [(32, 64, 8, 1)],
    ("tf32", 256): [(64, 32, 8, 1), (32, 32, 8, 2)],
    ("tf32", 512): [(64, 32, 8, 1), (32, 32, 8, 2)],
    ("tf32", 1024): [(16, 32, 8, 1)],
    ("ieee", 256): [(32, 16, 8, 1), (16, 16, 4, 1)],
    ("ieee", 512): [(32, 32, 8, 1), (32, 16, 8, 1)],
    ("ieee", 1024): [(32, 16, 8, 1)],
}
# No tf32 config holds a backward program's fp32 blocks of two chunks of 512 without spilling: there the backward
# runs the ieee configs, in ieee fp32 (more exact than tf32, at the FMA units' rate).
_BWD_CONFIGS = {
    ("16bit", 256): [(128, 32, 8, 2), (128, 16, 8, 2)],
    ("16bit", 512): [(64, 16, 8, 2), (32, 64, 8, 2)],
    ("16bit", 1024): [(32, 16, 8, 2), (16, 32, 8, 2)],
    ("tf32", 256): [(32, 16, 8, 1)],
    ("tf32", 512): [(32, 32, 8, 2), (32, 16, 8, 1)],
    ("ieee", 256): [(32, 16, 8, 1), (16, 16, 4, 1)],
    ("ieee", 512): [(32, 16, 8, 1), (16, 16, 4, 1)],
    ("ieee", 1024): [(32, 16, 8, 1)],
}
_MAX_DC = 512  # the widest chunk a block of D is loaded in; a wider D comes in two
_MAX_SPLITS = 8  # of a backward sweep: its partial sums are splits x the gradient in fp32
_LOSS_BLOCK = 1024  # rows of a _loss_kernel program
_FINISH_BLOCKS = {"BLOCK_R": 32, "BLOCK_C": 128}  # elementwise: 4096 elements a program
_SMALL_WARPS = 4  # of _loss_kernel and _finish_kernel

# Registers a thread and shared memory a block (bytes) of each config, as ptxas allocates them for sm_90: the most
# over the D of its width, its variants, and Triton 3.6 and 3.9 (`python -m kernels.compile_check --table`). They
# decide how many programs an SM holds at once; kernels.compile_check fails where a fresh compile holds fewer.
_RESOURCES = {
    ("_bwd_kernel", "16bit", 1024, (16, 32, 8, 2)): (161, 100352),
    ("_bwd_kernel", "16bit", 1024, (32, 16, 8, 2)): (170, 100352),
    ("_bwd_kernel", "16bit", 256, (128, 16, 8, 2)): (202, 132096),
    ("_bwd_kernel", "16bit", 256, (128, 32, 8, 2)): (218, 132096),
    ("_bwd_kernel", "16bit", 512, (32, 64, 8, 2)): (173, 103936),
    ("_bwd_kernel", "16bit", 512, (64, 16, 8, 2)): (248, 132096),
    ("_bwd_kernel", "ieee", 1024, (32, 16, 8, 1)): (200, 199680),
    ("_bwd_kernel", "ieee", 256, (16, 16, 4, 1)): (126, 34816),
    ("_bwd_kernel", "ieee", 256, (32, 16, 8, 1)): (104, 52224),
    ("_bwd_kernel", "ieee", 512, (16, 16, 4, 1)): (220, 66560),
    ("_bwd_kernel", "ieee", 512, (32, 16, 8, 1)): (214, 101376),
    ("_bwd_kernel", "tf32", 256, (32, 16, 8, 1)): (108, 66560),
    ("_bwd_kernel", "tf32", 512, (32, 16, 8, 1)): (162, 132096),
    ("_bwd_kernel", "tf32", 512, (32, 32, 8, 2)): (255, 197888),
    ("_finish_kernel",): (80, 1040),
    ("_fwd_kernel", "16bit", 1024, (32, 64, 8, 1)): (169, 132096),
    ("_fwd_kernel", "16bit", 256, (128, 32, 8, 2)): (120, 100352),
    ("_fwd_kernel", "16bit", 256, (128, 64, 8, 2)): (255, 134144),
    ("_fwd_kernel", "16bit", 256, (64, 64, 8, 2)): (195, 100352),
    ("_fwd_kernel", "16bit", 512, (128, 32, 8, 2)): (207, 198656),
    ("_fwd_kernel", "16bit", 512, (64, 64, 8, 2)): (255, 198656),
    ("_fwd_kernel", "ieee", 1024, (32, 16, 8, 1)): (176, 197632),
    ("_fwd_kernel", "ieee", 256, (16, 16, 4, 1)): (80, 33792),
    ("_fwd_kernel", "ieee", 256, (32, 16, 8, 1)): (80, 50176),
    ("_fwd_kernel", "ieee", 512, (32, 16, 8, 1)): (117, 99328),
    ("_fwd_kernel", "ieee", 512, (32, 32, 8, 1)): (124, 132096),
    ("_fwd_kernel", "tf32", 1024, (16, 32, 8, 1)): (228, 132096),
    ("_fwd_kernel", "tf32", 256, (32, 32, 8, 2)): (127, 67072),
    ("_fwd_kernel", "tf32", 256, (64, 32, 8, 1)): (160, 99328),
    ("_fwd_kernel", "tf32", 512, (32, 32, 8, 2)): (200, 132608),
    ("_fwd_kernel", "tf32", 512, (64, 32, 8, 1)): (248, 197632),
    ("_loss_kernel",): (96, 3072),
}

# The device the model prices a plan for: an H100 SXM. Dense tensor-core rates and HBM3 bandwidth from its
# datasheet (ieee fp32 runs on the FMA units); the L2's bandwidth and a launch's cost are assumptions, to be
# replaced by what .ci/gpu measures.
H100 = {"sms": 132, "registers": 65536, "shared": 233472, "warps": 64, "blocks": 32}
MODEL = {"tflops": {"16bit": 989.4, "tf32": 494.7, "ieee": 66.9}, "l2_tbps": 5.5, "hbm_tbps": 3.35, "launch_us": 5.0}
_TORCH_BLOCK = 512  # elements a block of PyTorch's elementwise kernels takes (128 threads, 4 each)

# Under TRITON_INTERPRET=1 the plan takes these blocks (small, so that tests cover several tiles and both chunks
# of D) on a device of _INTERPRET_SMS SMs, so that the sizes of the tests split the sweeps.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "MAX_DC": 128}
_INTERPRET_SMS = 6


def _interpreted():
    """True when the kernels were decorated under TRITON_INTERPRET=1 and the flag is still set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and type(_bwd_kernel).__name__ == "InterpretedFunction"


def _input_precision(dtype):
    if dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit inputs
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _kind(dtype, precision):
    """The config tables' key: "16bit", "tf32" or "ieee"."""
    return "16bit" if dtype != torch.float32 else precision


def _padded_dim(D):
    """The kernels' D: a multiple of 16, so that every row starts 16-byte aligned and loads vectorise."""
    return -(-D // 16) * 16


def _chunks(D, max_dc):
    """(NC, DC): the kernels' D in NC = 1 or 2 chunks of DC columns, a power of two (tl.arange's sizes)."""
    nc = 1 if D <= max_dc else 2
    return nc, max(16, triton.next_power_of_2(-(-D // nc)))


def programs_per_sm(registers, shared, warps):
    """How many programs of a kernel an H100 SM holds at once, by registers (allocated 8 a thread at a time),
    shared memory (a block also takes 1 KiB), warps and blocks."""
    by_registers = H100["registers"] // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, H100["shared"] // (shared + 1024), H100["warps"] // warps, H100["blocks"])


def _resource_key(kernel, kind, width, config):
    """_RESOURCES's key: the small kernels are one entry each, whatever their inputs."""
    return (kernel,) if kernel in ("_loss_kernel", "_finish_kernel") else (kernel, kind, width, config)


def _per_sm(kernel, kind, width, config, warps):
    """Programs per SM, from _RESOURCES; 1 where it has no entry (the interpreter's blocks)."""
    resources = _RESOURCES.get(_resource_key(kernel, kind, width, config))
    return 1 if resources is None else programs_per_sm(*resources, warps)


def _entry(kernel, produces, grid, per_sm, flops, bytes_, unique, tiles, sms, kind, gemm_flops, **launch):
    """One launch of the plan, priced: the launch cost plus the slowest of its FLOPs at the tensor-core rate, its
    bytes at the L2's bandwidth and its distinct bytes at HBM's, stretched by its imbalance. tiles: (the most tiles
    one program takes, the tiles of all programs); the busiest SM runs ceil(programs / SMs) of the longest."""
    programs = math.prod(grid)
    busiest, total = tiles
    stretch = sms * -(-programs // sms) * busiest / total
    seconds = max(flops / (MODEL["tflops"][kind] * 1e12), bytes_ / (MODEL["l2_tbps"] * 1e12),
                  unique / (MODEL["hbm_tbps"] * 1e12)) * stretch
    return dict(kernel=kernel, produces=produces, programs=programs, waves=programs / (sms * per_sm),
                gemms=flops / gemm_flops, bytes=bytes_, hbm_bytes=unique, flops=flops,
                ms=MODEL["launch_us"] * 1e-3 + seconds * 1e3, grid=grid, **launch)


def _torch_entry(op, produces, elements, bytes_, sms, kind, gemm_flops):
    """A PyTorch op of the plan (a fill, a copy, a reduction): one launch of cdiv(elements, _TORCH_BLOCK) blocks
    that moves bytes_, each once."""
    grid = (max(1, -(-elements // _TORCH_BLOCK)),)
    return _entry(op, produces, grid, H100["warps"] // 4, 0, bytes_, bytes_, (1, grid[0]), sms, kind, gemm_flops)


def _fwd_entry(c, config, groups, splits):
    """_fwd_kernel over c.sets matrices of c.n rows against c.N columns (c: _schedule's shape), with its bytes
    counted load by load: each program its row blocks once per split and every column block of its split once per
    row block; x and t once more for the positives; the partial LSEs and means."""
    bm, bn, warps, _ = config
    rb, cb = triton.cdiv(c.n, bm), triton.cdiv(c.N, bn)
    programs = groups * splits * c.sets
    col = 8 * rb * c.N + 8 * (rb - groups) * c.N if c.square else 0  # each block's column partials, merged in place
    bytes_ = (4 * programs + c.sets * splits * c.n * c.D * c.e + 2 * c.n * c.D * c.e + 4 * c.n
              + c.sets * rb * c.N * c.D * c.e + 8 * c.sets * splits * c.n + col)
    unique = c.sets * (c.n + c.N) * c.D * c.e + 4 * c.n + 8 * c.sets * splits * c.n + 8 * groups * c.N * c.square
    flops = c.sets * rb * cb * 2 * bm * bn * c.nc * c.dc
    tiles = (-(-rb // groups) * -(-cb // splits), c.sets * rb * cb)
    return _entry("_fwd_kernel", "partial LSEs and means of the rows" + (" and columns" if c.square else "")
                  + ", x_i.t_i", (groups, splits, c.sets), _per_sm("_fwd_kernel", c.kind, c.width, config, warps),
                  flops, bytes_, unique, tiles, c.sms, c.kind, c.gemm_flops, config=config, chunks=(c.nc, c.dc),
                  precision="tf32" if c.kind == "tf32" else "ieee", groups=groups, splits=splits)


def _loss_entry(c, groups, splits):
    """_loss_kernel: the partial LSEs and means merged; per program the loss's terms, d loss / d s's, max |w'|."""
    programs = triton.cdiv(c.n, _LOSS_BLOCK)
    parts = splits + (groups if c.square else splits)
    bytes_ = 4 * programs + 8 * c.n * parts + c.n * c.we + 4 * c.n + 8 * c.n + 12 * programs
    return _entry("_loss_kernel", "the LSEs; per program the loss, d loss / d s, max |w'|", (programs,),
                  _per_sm("_loss_kernel", c.kind, c.width, None, _SMALL_WARPS), 0, bytes_, bytes_, (1, programs),
                  c.sms, c.kind, c.gemm_flops)


def _bwd_entry(c, role, config, splits):
    """_bwd_kernel for one role (_ROLES): sets x owned blocks x splits x chunks programs, each loading its owned
    rows once and every swept block of its split once; bytes counted load by load."""
    owned_rows, swept_rows, sets, o_term, w_term, partial = _role(c, role)
    bo, bw, warps, _ = config
    ob, wb = triton.cdiv(owned_rows, bo), triton.cdiv(swept_rows, bw)
    programs = sets * ob * splits * c.nc
    stats = 4 * triton.cdiv(c.n, _LOSS_BLOCK)  # each program reads the maxima of |w'| for c
    side = lambda rows, term: rows * (c.D * c.e + (c.we + 4) * term)  # rows, and their weight and LSE
    out = 4 * sets * splits * owned_rows * c.DG if partial else sets * owned_rows * c.DG * c.e
    bytes_ = (programs * (4 + stats + 4 * (not partial)) + sets * splits * c.nc * side(owned_rows, o_term)
              + sets * ob * c.nc * side(swept_rows, w_term) + out)
    inputs = 2 * c.n * c.D * c.e if c.square else sets * (c.n + c.N) * c.D * c.e  # x and t, or those of its sets
    unique = inputs + (c.we + 8) * c.n + stats + out
    flops = sets * ob * c.nc * wb * 2 * bo * bw * (c.nc + 1) * c.dc
    tiles = (-(-wb // splits), sets * ob * c.nc * wb)
    return _entry("_bwd_kernel", _ROLES[role][0], (ob, splits * c.nc, sets),
                  _per_sm("_bwd_kernel", c.bwd_kind, c.width, config, warps), flops, bytes_, unique, tiles, c.sms,
                  c.bwd_kind, c.gemm_flops, config=config, chunks=(c.nc, c.dc),
                  precision="tf32" if c.bwd_kind == "tf32" else "ieee", splits=splits, role=role)


def _finish_entry(c, splits):
    """_finish_kernel: the local rows' gradients from their partial sums, added in order, and d s."""
    stats = 4 * triton.cdiv(c.n, _LOSS_BLOCK)
    br, bc = _FINISH_BLOCKS["BLOCK_R"], _FINISH_BLOCKS["BLOCK_C"]
    grid = (triton.cdiv(c.n, br), triton.cdiv(c.DG, bc), 2)
    programs = math.prod(grid)
    bytes_ = (programs * (stats + 8) + 2 * c.n * (4 * splits * c.DG + 2 * c.DG * c.e + grid[1] * c.we)
              + stats + 4)
    return _entry("_finish_kernel", "dx and dt, d logit_scale", grid,
                  _per_sm("_finish_kernel", c.kind, c.width, None, _SMALL_WARPS), 0, bytes_, bytes_,
                  (1, programs), c.sms, c.kind, c.gemm_flops, splits=splits)


# The backward's launches, by role: (what it produces, O_TERM, W_TERM, PARTIAL). square: S = s x @ t.T with both
# softmax terms; set 0 owns the rows of x (dx), set 1 those of t (dt: the columns of S, whose softmax is then the
# owned side's). rows: A = s x @ t_all.T and C = s t @ x_all.T, each set owning its local rows (dx, dt). Both
# leave their fp32 sums to _finish_kernel, which adds the positive pair. columns: each set owns the gathered rows
# (dt_all, dx_all), the softmax on the swept side, and writes the gradient itself.
_ROLES = {"square": ("dx and dt, partial sums", True, True, True),
          "rows": ("dx and dt, partial sums", True, False, True),
          "columns": ("dt_all and dx_all", False, True, False)}


def _role(c, role):
    """(owned rows, swept rows, sets, O_TERM, W_TERM, PARTIAL) of a backward launch."""
    _, o_term, w_term, partial = _ROLES[role]
    owned, swept = (c.N, c.n) if role == "columns" else (c.n, c.N)
    return owned, swept, c.column_sets if role == "columns" else 2, o_term, w_term, partial


class _Shape:
    """What _schedule plans for, with the derived sizes every entry uses."""

    def __init__(self, n, N, D, dtype, precision, sms, gathered, column_sets, weight_bytes, blocks):
        self.n, self.N, self.DG, self.sms = n, N, D, sms
        self.gathered, self.square, self.column_sets = gathered, not gathered, column_sets
        self.sets = 2 if gathered else 1
        self.e, self.we = torch.finfo(dtype).bits // 8, weight_bytes
        self.D = _padded_dim(D)
        self.blocks = None if blocks is None else dict(zip(_INTERPRET_BLOCKS, blocks))
        self.nc, self.dc = _chunks(self.D, _MAX_DC if blocks is None else self.blocks["MAX_DC"])
        self.width = max(256, self.nc * self.dc)
        self.kind = _kind(dtype, precision)
        self.bwd_kind = self.kind if blocks is not None or (self.kind, self.width) in _BWD_CONFIGS else "ieee"
        self.gemm_flops = 2 * n * N * D

    def configs(self, table, kind):
        if self.blocks is not None:
            return [(self.blocks["BLOCK_M"], self.blocks["BLOCK_N"], 1, 1)]
        return table[kind, self.width]


def _cheapest(options):
    """The option whose launches cost least in the model (then the fewest bytes): options are lists of entries."""
    return min(options, key=lambda es: (sum(e["ms"] for e in es), sum(e["bytes"] for e in es)))


@functools.lru_cache(maxsize=256)
def _schedule(n, N, D, dtype, precision, sms, gathered, column_sets, weight_bytes, blocks):
    """Every launch of one forward + backward, in order, as launch_plan describes them; the launchers run them.
    blocks: the interpreter's (_INTERPRET_BLOCKS's values), or None for the GPU's configs."""
    c = _Shape(n, N, D, dtype, precision, sms, gathered, column_sets, weight_bytes, blocks)
    plan = []
    if c.D != D:  # zero columns up to the padded D: one fill for all the copies, then one copy per input
        rows = 2 * n + 2 * N * gathered
        plan.append(_torch_entry("aten.new_zeros", "padded copies of the inputs", rows * c.D,
                                 rows * c.D * c.e, sms, c.kind, c.gemm_flops))
        for name, r in [("x", n), ("t", n)] + [("x_all", N), ("t_all", N)] * gathered:
            plan.append(_torch_entry("aten.copy_", f"{name} padded", r * D, 2 * r * D * c.e, sms, c.kind,
                                     c.gemm_flops))
    options = []
    for config in c.configs(_FWD_CONFIGS, c.kind):
        rb, cb = triton.cdiv(n, config[0]), triton.cdiv(N, config[1])
        # the square loss's column LSEs take groups x N floats: at most two groups per SM
        for groups in sorted({min(rb, sms), min(rb, 2 * sms)} if c.square else {rb}):
            for splits in range(1, min(cb, -(-4 * sms // (c.sets * groups))) + 1):
                options.append([_fwd_entry(c, config, groups, splits), _loss_entry(c, groups, splits)])
    plan += _cheapest(options)
    stats = triton.cdiv(n, _LOSS_BLOCK)
    plan.append(_torch_entry("aten.sum", "the loss", stats, 4 * stats + 4, sms, c.kind, c.gemm_flops))

    role = "rows" if gathered else "square"
    options = []
    for config in c.configs(_BWD_CONFIGS, c.bwd_kind):
        owned, swept, sets, *_ = _role(c, role)
        # split only while the owned blocks are too few to fill the SMs: the partial sums cost memory
        few = sets * triton.cdiv(owned, config[0]) * c.nc < sms
        for splits in range(1, min(triton.cdiv(swept, config[1]), _MAX_SPLITS if few else 1) + 1):
            options.append([_bwd_entry(c, role, config, splits), _finish_entry(c, splits)])
    bwd, finish = _cheapest(options)
    plan.append(bwd)
    if gathered and column_sets:
        plan += _cheapest([[_bwd_entry(c, "columns", config, 1)] for config in c.configs(_BWD_CONFIGS, c.bwd_kind)])
    plan.append(finish)
    return tuple(plan)


def launch_plan(n, N, D, dtype, sm_count, gathered=None, all_grads=True, weighted=True):
    """Every kernel that one forward + backward of the fused loss launches, Triton's and PyTorch's, in order, as
    dicts: kernel; produces; programs (of its grid), waves (programs over what sm_count SMs hold at once, from its
    config's registers and shared memory), gemms (its dot FLOPs over the 2 n N D of a similarity GEMM, tile
    padding included), bytes (read and written in global memory, every load of a block counted, reloads that L2
    serves included), hbm_bytes (the distinct bytes among them), flops, ms (modelled: MODEL) and, for the
    Triton kernels, grid and config.

    n rows against N columns of dimension D in dtype (fp32 follows torch.get_float32_matmul_precision(), as the
    kernels do). gathered: x_all, t_all are passed (default: when N != n; n == N with gathered=False is the
    square, one-GPU loss); all_grads: they need gradients; weighted: gate weights (fp32) are passed. Under
    TRITON_INTERPRET=1 the interpreter's blocks."""
    gathered = N != n if gathered is None else gathered
    assert gathered or N == n, "the square loss has N == n"
    precision = _input_precision(dtype)
    blocks = tuple(_INTERPRET_BLOCKS.values()) if _interpreted() else None
    return [dict(e) for e in _schedule(n, N, D, dtype, precision, sm_count, gathered, 2 * all_grads * gathered,
                                       4 * weighted, blocks)]


def modelled_ms(plan):
    """The modelled time of a launch plan on an H100 (MODEL): the sum of its launches'."""
    return sum(e["ms"] for e in plan)


# --------------------------------------------------------------------------------------------------
# Launchers


def _launch(kernel, entry, args, constexprs, blocks=()):
    """kernel on args over the plan entry's grid, its config's blocks named `blocks` (warps, stages on a GPU)."""
    config = entry.get("config") or (0, 0, _SMALL_WARPS, 1)
    constexprs.update(zip(blocks, config[:2]))
    if _interpreted():
        kernel[entry["grid"]](*args, **constexprs)
    else:
        kernel[entry["grid"]](*args, **constexprs, num_warps=config[2], num_stages=config[3])


def _padded(x, t, x_all, t_all):
    """The inputs with zero columns up to the kernels' D: one fill and one copy each, only when D is not a
    multiple of 16 (launch_plan lists them)."""
    inputs = [a for a in (x, t, x_all, t_all) if a is not None]
    D = x.shape[1]
    if D % 16 == 0:
        return inputs
    dp = _padded_dim(D)
    flat = x.new_zeros(sum(a.shape[0] for a in inputs) * dp)
    out, start = [], 0
    for a in inputs:
        out.append(flat[start:start + a.shape[0] * dp].view(a.shape[0], dp))
        out[-1][:, :D].copy_(a)
        start += a.shape[0] * dp
    return out


def _forward(plan, x, t, x_all, t_all, scale, weight):
    """(LSE (2, n), STATS (3, programs)), both fp32, from the plan's _fwd_kernel and _loss_kernel launches; the
    inputs padded. LSE holds LSE_j A_ij and LSE_j C_ij (square: the row and column LSE of S)."""
    fwd, loss = (e for e in plan if e["kernel"] in ("_fwd_kernel", "_loss_kernel"))
    (n, D), square = x.shape, x_all is None
    N = n if square else x_all.shape[0]
    sets, groups, splits = fwd["grid"][2], fwd["groups"], fwd["splits"]
    row = torch.empty(2, sets, splits, n, device=x.device, dtype=torch.float32)
    col = torch.empty(2, groups, N, device=x.device, dtype=torch.float32) if square else row
    pos = torch.empty(n, device=x.device, dtype=torch.float32)
    assert max(row.numel(), col.numel()) < 2**31, "too large for the kernels' int32 offsets"
    k0, q1, k1 = (t, x, t) if square else (t_all, t, x_all)
    nc, dc = fwd["chunks"]
    _launch(_fwd_kernel, fwd, (x, k0, q1, k1, t, scale, row, col, pos, n, N, D),
            dict(COL_LSE=square, NC=nc, DC=dc, PRECISION=fwd["precision"], UPCAST=_interpreted()),
            ("BLOCK_M", "BLOCK_N"))
    lse = torch.empty(2, n, device=x.device, dtype=torch.float32)
    stats = torch.empty(3, loss["programs"], device=x.device, dtype=torch.float32)
    _launch(_loss_kernel, loss, (row, col, pos, scale if weight is None else weight, scale, lse, stats, n, splits,
                                 groups), dict(COL_LSE=square, HAS_WEIGHT=weight is not None, BLOCK_R=_LOSS_BLOCK))
    return lse, stats


def _backward(plan, inputs, D, dtype, scale, weight, lse, stats, grad, needs):
    """(dx, dt, d logit_scale, dx_all, dt_all) from the plan's _bwd_kernel and _finish_kernel launches. inputs:
    the padded x, t (x_all, t_all); needs: whether x_all and t_all need gradients; D: the gradients' width."""
    x, t, x_all, t_all = (list(inputs) + [None, None])[:4]
    n = x.shape[0]
    new = lambda rows: torch.empty(rows, D, device=x.device, dtype=dtype)
    dx, dt = new(n), new(n)
    dx_all = new(x_all.shape[0]) if needs[0] else None
    dt_all = new(t_all.shape[0]) if needs[1] else None
    dscale = torch.empty((), device=x.device, dtype=torch.float32)
    finish = plan[-1]
    parts = torch.empty(2, finish["splits"], n, D, device=x.device, dtype=torch.float32)
    assert parts.numel() < 2**31, "too large for the kernels' int32 offsets"
    # per role, its sets: (owned rows, swept rows, owned rows' LSE, swept rows' LSE, where the gradient goes)
    sets = {"square": [(x, t, lse[0], lse[1], parts[0]), (t, x, lse[1], lse[0], parts[1])],
            "rows": [(x, t_all, lse[0], lse[0], parts[0]), (t, x_all, lse[1], lse[1], parts[1])],
            "columns": [s for s, need in [((t_all, x, lse[0], lse[0], dt_all), needs[1]),
                                          ((x_all, t, lse[1], lse[1], dx_all), needs[0])] if need]}
    common = (scale if weight is None else weight, scale, grad, stats)
    for entry in plan:
        if entry["kernel"] == "_bwd_kernel":
            _, o_term, w_term, partial = _ROLES[entry["role"]]
            these = sets[entry["role"]]
            pairs = these + these[:1] * (2 - len(these))  # a second set that the grid never reaches
            nc, dc = entry["chunks"]
            _launch(_bwd_kernel, entry, (*pairs[0], *pairs[1], *common, these[0][0].shape[0], these[0][1].shape[0],
                                         x.shape[1], D, n, stats.shape[1]),
                    dict(O_TERM=o_term, W_TERM=w_term, PARTIAL=partial, HAS_WEIGHT=weight is not None, NC=nc, DC=dc,
                         PRECISION=entry["precision"], UPCAST=_interpreted()), ("BLOCK_O", "BLOCK_W"))
    _launch(_finish_kernel, finish, (parts[0], dx, t, parts[1], dt, x, *common, dscale, n, x.shape[1], D,
                                     finish["splits"], stats.shape[1]),
            dict(HAS_WEIGHT=weight is not None, **_FINISH_BLOCKS))
    return dx, dt, dscale, dx_all, dt_all


def _check_inputs(x, t, logit_scale, weight, x_all, t_all, offset, fused):
    """Every check on gated_clip_loss's arguments; fused adds what the kernels need."""
    assert x.dim() == 2 and x.shape == t.shape, f"x {tuple(x.shape)} and t {tuple(t.shape)} must be the same (n, D)"
    n, D = x.shape
    assert (x_all is None) == (t_all is None), "pass both x_all and t_all, or neither"
    if x_all is not None:
        assert x_all.dim() == 2 and x_all.shape == t_all.shape and x_all.shape[1] == D, \
            f"x_all {tuple(x_all.shape)} and t_all {tuple(t_all.shape)} must be the same (N, {D})"
        assert 0 <= offset <= x_all.shape[0] - n, f"offset {offset}: rows offset..offset+{n}-1 must lie in x_all"
    assert weight is None or weight.shape == (n,), f"weight {tuple(weight.shape)} must be ({n},)"
    assert not torch.is_tensor(logit_scale) or logit_scale.numel() == 1, "logit_scale must be a scalar"
    if not fused:
        return
    tensors = [x, t] + ([] if x_all is None else [x_all, t_all])
    assert all(a.dtype == x.dtype for a in tensors) and x.dtype in (torch.float32, torch.bfloat16, torch.float16), \
        f"dtypes {[a.dtype for a in tensors]}: need one of float32, bfloat16, float16 for all"
    assert all(a.device == x.device for a in tensors), f"devices {[a.device for a in tensors]}"
    assert 1 <= D <= MAX_D, f"feature dim {D} outside 1..{MAX_D}"
    assert max(a.shape[0] for a in tensors) * _padded_dim(D) < 2**31, "too large for the kernels' int32 offsets"


# --------------------------------------------------------------------------------------------------
# Autograd


class _GatedClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, logit_scale, weight, x_all, t_all):
        # weight: (n,) gate weights, a constant, or None. x_all is None selects the square case.
        n, D = x.shape
        needs = (x_all is not None and ctx.needs_input_grad[4], t_all is not None and ctx.needs_input_grad[5])
        plan = _plan(n, n if x_all is None else x_all.shape[0], D, x.dtype, x.device, x_all is not None,
                     sum(needs), 0 if weight is None else weight.element_size())
        scale = logit_scale.detach().float().reshape(1)
        inputs = _padded(x, t, x_all, t_all)
        lse, stats = _forward(plan, *(inputs + [None, None])[:4], scale, weight)
        ctx.plan, ctx.D, ctx.needs = plan, D, needs
        ctx.save_for_backward(logit_scale, weight, lse, stats, *inputs)
        return stats[0].sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logit_scale, weight, lse, stats, *inputs = ctx.saved_tensors
        scale = logit_scale.detach().float().reshape(1)
        dx, dt, dscale, dx_all, dt_all = _backward(ctx.plan, inputs, ctx.D, inputs[0].dtype, scale, weight, lse,
                                                   stats, grad_loss.float().reshape(1), ctx.needs)
        return dx, dt, dscale.to(logit_scale.dtype).reshape(logit_scale.shape), None, dx_all, dt_all


def _plan(n, N, D, dtype, device, gathered, column_sets, weight_bytes):
    """The launch plan the launchers run: launch_plan's, for this device."""
    blocks = tuple(_INTERPRET_BLOCKS.values()) if _interpreted() else None
    return _schedule(n, N, D, dtype, _input_precision(dtype), _sm_count(device), gathered, column_sets,
                     weight_bytes, blocks)


def _sm_count(device):
    if _interpreted():
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------------
# The reference's cost, for auto


class _CountOps(TorchDispatchMode):
    """The modelled time of the ops run under it (on meta tensors, which compute nothing): per op a launch, its
    bytes (tensors read and written) at the L2's bandwidth, its matmul FLOPs at the tensor-core rate of kind."""

    NO_LAUNCH = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "reshape", "slice", "select", "t",
                 "transpose", "expand", "as_strided", "detach", "alias", "unsqueeze", "squeeze", "permute",
                 "promote_types", "lift_fresh"}

    def __init__(self, kind):
        super().__init__()
        self.kind, self.ms = kind, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self.NO_LAUNCH:
            size = lambda a: a.numel() * a.element_size() if torch.is_tensor(a) else 0
            read = sum(map(size, tree_flatten((args, kwargs))[0]))
            launches = 1
            if name == "logsumexp":  # ATen runs it as amax, sub, exp_, sum, log_, add_: five passes over the input
                launches, read = 6, 5 * read
            flops = 2 * math.prod(args[0].shape) * args[1].shape[-1] if name in ("mm", "bmm") else 0
            seconds = max(flops / (MODEL["tflops"][self.kind] * 1e12),
                          (read + sum(map(size, tree_flatten(out)[0]))) / (MODEL["l2_tbps"] * 1e12))
            self.ms += launches * MODEL["launch_us"] * 1e-3 + seconds * 1e3
        return out


@functools.lru_cache(maxsize=256)
def _reference_ms(n, N, D, dtype, precision, gathered):
    """The modelled time of gated_clip_loss_reference, forward + backward, weighted: its ops counted on meta tensors.
    Its GEMMs run on fp32 inputs (it widens 16-bit ones), in precision ("ieee" or "tf32": torch's fp32 setting)."""
    meta = dict(device="meta", requires_grad=True)
    x_all, t_all = torch.empty(N, D, dtype=dtype, **meta), torch.empty(N, D, dtype=dtype, **meta)
    s = torch.empty((), **meta)
    leaves = [x_all, t_all, s]
    with _CountOps(precision) as count:
        if gathered:
            loss = gated_clip_loss_reference(x_all[:n], t_all[:n], s, torch.empty(n, device="meta"), x_all=x_all,
                                             t_all=t_all)
        else:
            loss = gated_clip_loss_reference(x_all, t_all, s, torch.empty(n, device="meta"))
        torch.autograd.grad(loss, leaves, torch.ones((), device="meta"))
    return count.ms


# --------------------------------------------------------------------------------------------------
# Public functions


def fused_available(device):
    """Whether the Triton kernels can run on this device: CUDA, or the CPU under TRITON_INTERPRET=1."""
    return torch.device(device).type == "cuda" or _interpreted()


def choose_impl(n, N, D, dtype, device, impl="auto"):
    """(name, reason): which implementation gated_clip_loss runs on n rows against N columns of dimension D in
    dtype on device, "fused" or "reference". impl "fused" and "reference" are obeyed ("fused" raises
    RuntimeError where the kernels cannot run); "auto" takes the reference off CUDA (the interpreter is for
    tests) and for dtypes or D the kernels lack, and else whichever is modelled faster on an H100 (MODEL): the
    fused loss's launch plan (launch_plan, gathered when N != n) against the reference's ops, counted."""
    if impl not in ("auto", "fused", "reference"):
        raise ValueError(f"impl {impl!r}: choose auto, fused or reference")
    device = torch.device(device)
    if impl == "reference":
        return "reference", "asked for"
    if impl == "fused":
        if not fused_available(device):
            raise RuntimeError(f"the fused kernels need a CUDA device or TRITON_INTERPRET=1, not {device.type}")
        return "fused", "asked for" + (" (Triton interpreter)" if device.type != "cuda" else "")
    if device.type != "cuda":
        return "reference", "auto: the fused kernels run on CUDA"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or D > MAX_D:
        return "reference", f"auto: the fused kernels take fp32, bf16 or fp16 with D <= {MAX_D}"
    fused, reference = auto_costs(n, N, D, dtype, device)
    need = REFERENCE_MATRICES * 4 * n * N
    if reference <= fused and need > _free_memory(device):
        return "fused", (f"auto: modelled {fused:.3g} ms fused, {reference:.3g} ms reference, whose n x N matrices "
                         f"({need / 2**30:.1f} GiB) would not fit in the device's free memory")
    name = "fused" if fused < reference else "reference"
    return name, f"auto: modelled {fused:.3g} ms fused, {reference:.3g} ms reference"


# The reference's peak, in fp32 n x N matrices: the two directions' logits, kept for the backward, and their two
# softmax gradients. What auto checks against the device's free memory before it picks the reference.
REFERENCE_MATRICES = 4


def _free_memory(device):
    """Bytes free on the CUDA device (unbounded where torch sees none: choose_impl priced for an H100)."""
    return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else math.inf


def auto_costs(n, N, D, dtype, device):
    """(fused, reference): the modelled ms of one forward + backward of each, the rule of choose_impl's auto: the
    fused loss's plan for the device's SM count (an H100's where no CUDA device is visible), weighted, every input
    needing its gradient; the reference's ops counted on meta tensors."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else H100["sms"]
    plan = _schedule(n, N, D, dtype, _input_precision(dtype), sms, N != n, 2 * (N != n), 4, None)
    return modelled_ms(plan), _reference_ms(n, N, D, dtype, _input_precision(torch.float32), N != n)


def gated_clip_loss(x, t, logit_scale, weight=None, *, x_all=None, t_all=None, offset=0, impl="auto"):
    """mean_i w_i (LSE_j(s x_i.t_all_j) - s x_i.t_i + LSE_j(s t_i.x_all_j) - s t_i.x_i) / 2.

    x, t: (n, D) L2-normalised features of this rank (float32, bfloat16 or float16, D <= 1024 for the kernels).
    logit_scale: the scale s (0-dim tensor, may require grad). weight: (n,) per-sample weights, a constant
    (no gradient flows to it). x_all, t_all: (N, D) gathered features, or both None for the single-GPU loss
    (= alip.contrastive_loss). offset: where this rank's rows sit in x_all, t_all (rows offset .. offset+n-1 are
    x and t, the positives' columns); only checked, since the positive pair x_i.t_i is taken from x and t.
    impl: "fused" (the Triton kernels), "reference" (gated_clip_loss_reference) or "auto" (choose_impl's rule).
    Returns a 0-dim fp32 tensor. Differentiable in x, t, x_all, t_all and logit_scale. The kernels give the same
    bits on the same inputs (no atomics; every config and grid is the plan's), with or without
    torch.use_deterministic_algorithms(True).
    """
    N = x.shape[0] if x_all is None else x_all.shape[0]
    name, _ = choose_impl(x.shape[0], N, x.shape[1], x.dtype, x.device, impl)
    _check_inputs(x, t, logit_scale, weight, x_all, t_all, offset, name == "fused")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=x.device)
    if name == "reference":
        return gated_clip_loss_reference(x, t, logit_scale, weight, x_all=x_all, t_all=t_all, offset=offset)
    if x_all is x and t_all is t:  # the gathered features are the local ones: one matrix serves both directions
        x_all = t_all = None
    x, t = x.contiguous(), t.contiguous()  # the kernels index rows as row * D
    if x_all is not None:
        x_all, t_all = x_all.contiguous(), t_all.contiguous()
    weight = None if weight is None else weight.detach().contiguous()
    return _GatedClipLoss.apply(x, t, logit_scale, weight, x_all, t_all)
