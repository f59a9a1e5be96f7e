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
    ds = sum_ij w'_i (P_ij A_ij + Q_ij C_ij) / s - 2 sum_i w'_i x_i.t_i

Square case (no *_all): C = A.T, so LSE_j C_ij is the column LSE of A, one matrix serves both directions, and
with p_ij = w'_i P_ij + w'_j Q_ji both gradients come from it: dx_i = s (sum_j p_ij t_j - 2 w'_i t_i), dt_j =
s (sum_i p_ij x_i - 2 w'_j x_j).

Kernels, of the flash-attention kind: a tile of S = q @ k.T is accumulated in fp32 over D in chunks of BLOCK_K,
used in registers, and dropped. Every launch is sized to put at least one program on every SM wherever its tiles
allow (launch_plan lists them): a DDP rank's n = 512 rows give 4 to 8 row blocks, too few to parallelise over
alone, so the sweeps over the other side are split too, and the partial results merge exactly.
  _lse_fwd_kernel  program (group, split): row blocks group, group + G, ... (G <= 2 per SM) against column blocks
                   split, split + S, ..., an online softmax over them (a real running max, so logits near -s never
                   underflow). Each writes its rows' partial LSE in row split of an (S, n) workspace and, for the
                   square loss, in row group of a (G, N) one the LSE over its rows of every column, merged block by
                   block. The launcher merges the partials exactly (the LSE of partial LSEs m_s is the LSE of all
                   their terms: m + log sum_s exp(m_s - m)), as flash-decoding merges its splits. S = cdiv(SMs, G)
                   splits (at most one per column block) while the row blocks are fewer than the SMs.
  _bwd_kernel      program (block of BLOCK_N owned columns of S, split of the rows, slice of D): it keeps the
                   owned columns' gradient, sum_i p_ij q_i, in a (BLOCK_N, BLOCK_D) fp32 register accumulator and
                   sweeps its split of the row blocks. Per tile it recomputes S once (over all of D), forms p_ij =
                   wq_i exp(S_ij - lq_i) + wk_j exp(S_ij - lk_j) (either term optional), adds p.T @ q (q's slice is
                   loaded before the sweep of S, so its latency hides behind it) and, from the same p, the rows'
                   terms p @ k, BLOCK_K columns at a time, atomically into an fp32 (n, D) workspace; the owned sums
                   go to an fp32 workspace too (atomically when a column's rows are split). One recompute of S
                   feeds both gradients: dx and dt (or dx and dt_all, dt and dx_all) come from one launch, plus
                   sum_ij p_ij q_i.k_j for ds.
                   Deterministic path (torch.use_deterministic_algorithms(True), PyTorch's convention): no atomics.
                   Two launches per matrix, each owning one side (the columns, then with q and k swapped the rows);
                   each split stores its partial sum in its own row of a (splits, rows, D) workspace, the fixed
                   first config of the table runs (not autotuned), and the partials are added in order: the same
                   inputs give the same bits, at one more similarity GEMM per matrix.
  _finish_kernel   the gradient from its fp32 partial sums, in order: gscale (sum - 2 w'_i diag_i), cast once to the
                   input dtype (the positive-pair term, the scale and the cast fused in).
Why D is split. The accumulator lives in registers: 32 x 512 fp32 is 64 KiB, a quarter of an SM's register file;
ptxas holds it beside the S tile, p, q's slice in flight and the rows' (BLOCK_M, BLOCK_K) product without
spilling (230-255 registers a thread); 64 x 512 does only next to a 32-row q slice, and wider ones spill. Beyond
BLOCK_D (512 for bf16, fp16 and tf32, padded to a power of two; 256 for ieee fp32, whose tl.dot runs on the FMA
units with its operands in registers) the gradient is split in sigma = cdiv(D, BLOCK_D) slices, each recomputing
S. D that is not a multiple of 16 is padded with zero columns by the launcher (a copy; zeros add nothing to any
product), so every row starts 16-byte aligned and every load vectorises; the gradients are written D wide. The
configs are those that `python -m kernels.compile_check` proves free of spills on Triton 3.6 and 3.9.

Cost in similarity GEMMs (one = 2 n N D FLOPs: a sweep of tiles of S = q @ k.T, of p.T @ q or of p @ k):
                       forward   backward                            total at sigma = 1 (D <= 512)
  square               1         sigma + 2                           4 (the floor: sweep, recompute, P t, P^T x)
  square, determ.      1         2 (sigma + 1)                       5
  gathered             2         2 (sigma + 2)                       8 (the floor)
  gathered, determ.    2         4 (sigma + 1)                       10
  gathered, *_all without grad: 2 + 2 (sigma + 1) = 6.  alip.contrastive_loss does 6 (two logit matrices and
  their two gradients each) but writes and reads several n x N matrices to do them.
The two ALIP paths (raw text, caption) are two calls. They share x, but the kernels are bound by the GEMMs and L2,
not by loading x, so fusing them would save no GEMM.
Bytes moved: HBM traffic is O((n + N) D): the inputs, the fp32 workspaces and the gradients. From L2, a tile of
(BLOCK_M, BLOCK_N) reads (2 BLOCK_M + 2 BLOCK_N) D input elements (q and k chunks for S, q's slice, k's chunks for
p @ k) and adds 4 BLOCK_M D bytes atomically: the price of the saved GEMM is 2 / (3 BLOCK_N) bytes of fp32 atomics
per FLOP, which the deterministic path does not pay. kernels.bench times both.
Extra memory, beyond the inputs and the gradients, of forward + backward (tests/test_kernels.py checks it), with
P the SM count, Dp = D rounded up to 16, e the input's bytes per element, B_m = 128 and B_n = 64 the largest row
block of the forward's configs and owned block of the backward's:
    forward   4 (n + P B_m) + 8 P N (square only: the column LSE) + 12 min(n, 4096) D (x_i.t_i's fp32 copies)
    backward  4 (n + N + P B_n) Dp   (the fp32 sums of dq and dk, or one side's partial sums on the deterministic
                                      path: the same order as the gradients themselves)
    extra <=  max(forward, backward) + e (n + N) Dp (the padded copies, D not a multiple of 16) + 64 n + 16 N
At B = n = N = 1,048,576, D = 512, bf16, on a 132-SM H100: forward 1,136,723,968 and backward 4,312,268,800
bytes, so 4,396,154,880 bytes (4.1 GiB) with the vectors, next to 2 GiB of inputs and 2 GiB of gradients. A DDP
rank's n = 512 of N = 4096: 26,836,992 bytes (25.6 MiB). The first call of a shape on a GPU also autotunes,
which restores or zeroes the workspaces between trial runs.

Precision. Scores, softmax sums and gradients accumulate in fp32. bf16/fp16 inputs: exact products, fp32 sums; P
is rounded to the input dtype for the p.T @ q and p @ k GEMMs, as in flash attention, and each gradient is rounded
once to the input dtype. fp32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's default) ->
ieee fp32 GEMMs, "high"/"medium" -> tf32 (what the PyTorch reference does under the same setting). ds is summed
in fp32 before P is rounded: the softmax and positive terms nearly cancel when all logits are equal.
p = w'_i P_ij is about w / (2 n N), which fp16 cannot hold at large n (below half its smallest subnormal, 3e-8,
from about n = N = 4096 on for w = 1); so the kernels get the weights times a power of two c, c max|w'| in
(2^13, 2^14] (c |p| <= 2^15 < 65504), and the gradient scale divided by c: exact, and p keeps fp16's 11 bits
down to 2^-29 of the largest p. The atomic path adds the rows' fp32 terms in whatever order they arrive: the
sums differ from run to run in their last bits, which the one rounding to 16 bits mostly hides.
Max error / max |value| against float64 on the same rounded inputs (Triton interpreter, B = 200, D = 64, s = 100,
weights in [0, 2), two seeds, both paths; the interpreter computes fp32 GEMMs in ieee):
    fp32  loss 7e-8, gradients <= 3e-6       bf16  loss 3e-8, gradients <= 8.1e-3 (p rounded to bf16, below)
    fp16  loss 5e-8, gradients <= 4.3e-4     ds    <= 2e-7 in every dtype
The 16-bit gradients carry an error that does not shrink with them: p_ij is rounded before the P @ k GEMM and the
positive term -2 w'_i diag_i is added in fp32 after it, so where a row's softmax and positive term cancel (a
confident positive, P_ii near 1) the error stays at about s w'_i 2^-9 |k| (bf16; 2^-12 for fp16), 0.4% of the
row's gradient scale s w'_i. Folding the positive term into p before the rounding would remove it.
tf32 (GPU only, not measured here): rounding the inputs alone moves the gradients by ~6e-4 and the loss by ~1e-6
relative (B = 2048, D = 512, s = 100, float64 emulation); tests/test_kernels.py::test_tf32 allows 2e-2.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_D = 1024  # the largest D that kernels.compile_check covers (the backward splits D in slices beyond 512)


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
def _scores(Q, K, rows, cols, row_ok, col_ok, D, scale,
            INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """q[rows] @ k[cols].T in fp32 (0 on padding), and s times it with padding set to -1e30: exp(-1e30 - m) is 0,
    and a fully padded row or column never computes -inf - -inf = NaN."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = (ks < D) | EVEN_K  # a mask known to be all-true lets 16-bit loads vectorise and pipeline
        q = tl.load(Q + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(K + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            q, k = q.to(tl.float32), k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=INPUT_PRECISION)
    return acc, tl.where(row_ok[:, None] & col_ok[None, :], acc * scale, -1.0e30)


@triton.jit
def _lse_fwd_kernel(
    Q,         # (M, D) rows of the similarity matrix (x or t), contiguous
    K,         # (N, D) its columns (t_all or x_all), contiguous, same dtype
    SCALE,     # (1,) fp32, the logit scale s
    ROW_PART,  # (splits, M) fp32 out: per split of the column blocks, the LSE over its columns of s q_i.k_j
    COL_PART,  # (groups, N) fp32, -inf on entry, used if COL_LSE: per group of row blocks, the LSE over its rows
    M, N, D,
    COL_LSE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (group, split): row blocks group, group + groups, ... against column blocks split, split + splits, ...
    # (strided, so that no index needs a division)
    group, split = tl.program_id(0), tl.program_id(1)
    groups, splits = tl.num_programs(0), tl.num_programs(1)
    scale = tl.load(SCALE)
    for rb in range(group, tl.cdiv(M, BLOCK_M), groups):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running row max
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(score - m_i)
        for j0 in range(split * BLOCK_N, N, splits * BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            _, a = _scores(Q, K, rows, cols, row_ok, col_ok, D, scale,
                           INPUT_PRECISION, UPCAST, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(a, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(a - m_new[:, None]), 1)
            m_i = m_new
            if COL_LSE:
                # every row block holds a real row, so the block's column sum is >= 1 on real columns; merged
                # into the group's LSE over its earlier row blocks (-inf before its first)
                c_max = tl.max(a, 0)
                c_lse = c_max + tl.log(tl.sum(tl.exp(a - c_max[None, :]), 0))
                old = tl.load(COL_PART + group * N + cols, mask=col_ok, other=0.0)
                hi = tl.maximum(old, c_lse)
                tl.store(COL_PART + group * N + cols, hi + tl.log(tl.exp(old - hi) + tl.exp(c_lse - hi)), mask=col_ok)
        tl.store(ROW_PART + split * M + rows, m_i + tl.log(l_i), mask=row_ok)
        if COL_LSE:
            tl.debug_barrier()  # this block's column stores are seen by every thread before the next block reads


@triton.jit
def _bwd_kernel(
    Q,      # (M, D) rows of S = s q @ k.T, swept by every program BLOCK_M at a time, contiguous
    K,      # (N, D) columns of S, contiguous, Q's dtype; a program owns BLOCK_N of them
    SCALE,  # (1,) fp32, the logit scale s
    WQ,     # (M,) fp32 weights c w' of the rows, read if Q_TERM
    LQ,     # (M,) fp32 row LSE of S, read if Q_TERM
    WK,     # (N,) fp32 weights c w' of the columns, read if K_TERM
    LK,     # (N,) fp32 column LSE of S (the row LSE of S.T), read if K_TERM
    DQ,     # (M, D) fp32, written if ATOMIC: += sum_j p_ij k_j over the program's columns, atomically
    DK,     # ATOMIC: (N, D) fp32 += sum_i p_ij q_i over the program's rows, atomically; else (splits, N, D) fp32
            # out, that sum in the row of the program's split
    DS,     # (splits, owner blocks) fp32 out: sum of p_ij q_i.k_j over the program's tiles (by the first slice)
    M, N, D,
    Q_TERM: tl.constexpr, K_TERM: tl.constexpr, ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (owner block, split, slice of D): the owner blocks of a split are neighbours, so they sweep the same
    # rows at about the same time (from L2); split sweeps row blocks split, split + splits, ...
    owner, split = tl.program_id(0), tl.program_id(1)
    owners, splits = tl.num_programs(0), tl.num_programs(1)
    cols = owner * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    d0 = tl.program_id(2) * BLOCK_D
    dims = d0 + tl.arange(0, BLOCK_D)
    dim_ok = (dims < D) | EVEN_D
    d_end = tl.minimum(d0 + BLOCK_D, D)
    scale = tl.load(SCALE)
    if K_TERM:
        wk = tl.load(WK + cols, mask=col_ok, other=0.0)
        lk = tl.load(LK + cols, mask=col_ok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ds = tl.zeros([BLOCK_N], dtype=tl.float32)
    for rb in range(split, tl.cdiv(M, BLOCK_M), splits):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        # the rows' slice for P.T @ q, loaded before the sweep of S so that its latency hides behind it
        q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        qk, a = _scores(Q, K, rows, cols, row_ok, col_ok, D, scale,
                        INPUT_PRECISION, UPCAST, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # all of D, once per tile
        # exponents are <= 0 up to rounding (an LSE bounds every score it contains); padding gives exp = 0
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if Q_TERM:
            wq = tl.load(WQ + rows, mask=row_ok, other=0.0)
            lq = tl.load(LQ + rows, mask=row_ok, other=0.0)
            p += wq[:, None] * tl.exp(a - lq[:, None])
        if K_TERM:
            p += wk[None, :] * tl.exp(a - lk[None, :])
        # d loss / d s, summed before p is rounded: sum_j p_ij = c w'_i nearly cancels the positive pair
        ds += tl.sum(p * qk, 0)
        p = p.to(Q.dtype.element_ty)
        if UPCAST:
            p, q = p.to(tl.float32), q.to(tl.float32)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=INPUT_PRECISION)
        if ATOMIC:
            # the same tile of p gives the rows their terms, BLOCK_K columns of the gradient at a time, so that
            # no second (BLOCK_M, BLOCK_D) fp32 tile is live next to the accumulator
            for c0 in range(d0, d_end, BLOCK_K):
                ks = c0 + tl.arange(0, BLOCK_K)
                k_ok = (ks < D) | EVEN_K
                k = tl.load(K + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                tl.atomic_add(DQ + rows[:, None] * D + ks[None, :], tl.dot(p, k, input_precision=INPUT_PRECISION),
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
    out_ok = col_ok[:, None] & dim_ok[None, :]
    if ATOMIC:
        tl.atomic_add(DK + cols[:, None] * D + dims[None, :], acc, mask=out_ok, sem="relaxed")
    else:
        tl.store(DK + (split * N + cols[:, None]) * D + dims[None, :], acc, mask=out_ok)
    if d0 == 0:  # every slice computes the same S
        tl.store(DS + split * owners + owner, tl.sum(ds))


@triton.jit
def _finish_kernel(
    PART,    # (parts, R, DP) fp32: partial sums of the gradient, D columns of each DP-wide row real
    DIAG,    # (R, D) positive partner of each row (t for rows of x, x for rows of t), read if HAS_DIAG
    W,       # (R,) fp32 weights c w' of the rows, read if HAS_DIAG
    GSCALE,  # (1,) fp32, grad_loss * s / c
    G,       # (R, D) out, the input dtype: GSCALE * (sum of the parts - 2 w_i diag_i)
    R, D, DP, PARTS,
    HAS_DIAG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < R)[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for part in range(PARTS):  # in order: the same partial sums give the same bits
        acc += tl.load(PART + (part * R + rows[:, None]) * DP + cols[None, :], mask=ok, other=0.0)
    if HAS_DIAG:  # the positive pair appears in both directions: -2 w'_i diag_i
        w = tl.load(W + rows, mask=rows < R, other=0.0)
        acc -= 2 * w[:, None] * tl.load(DIAG + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(G + rows[:, None] * D + cols[None, :], (acc * tl.load(GSCALE)).to(G.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launchers

# Configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by input kind: "16bit" (bf16, fp16), "tf32" and
# "ieee" (fp32 under torch.get_float32_matmul_precision() "high"/"medium" and "highest"). The backward's are also
# keyed by BLOCK_D, the width of the gradient slice a program accumulates (_block_d picks it), and by whether
# it adds the rows' gradient atomically; there BLOCK_M is the swept rows, BLOCK_N the owned columns. These are
# the candidates that ptxas compiles for sm_90 with no spill and within an H100 block's 227 KiB of shared memory,
# on Triton 3.6 and 3.9 alike, for D = 16 .. 1024: `python -m kernels.compile_check` compiles them all and fails
# otherwise. The first of each list is the one the deterministic path runs (it is not autotuned).
_FWD_CONFIGS = {
    "16bit": [(128, 64, 64, 4, 3), (64, 128, 64, 8, 3)],
    "tf32": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],
    "ieee": [(64, 32, 16, 8, 2)],
}
_BWD_BLOCK_D = {"16bit": 512, "tf32": 512, "ieee": 256}  # the widest slice a clean config holds
_BWD_CONFIGS = {
    ("16bit", 512, True): [(64, 32, 64, 8, 3), (32, 64, 32, 8, 3)],
    ("16bit", 512, False): [(64, 32, 64, 8, 3), (32, 64, 32, 8, 3)],
    ("16bit", 256, True): [(64, 64, 64, 8, 3)],
    ("16bit", 256, False): [(64, 64, 64, 8, 3), (128, 64, 64, 8, 2)],
    ("16bit", 128, True): [(128, 64, 64, 8, 3)],
    ("16bit", 128, False): [(128, 64, 64, 8, 3)],
    ("16bit", 64, True): [(128, 64, 64, 8, 3), (64, 64, 64, 8, 3)],
    ("16bit", 64, False): [(128, 64, 64, 8, 3), (64, 64, 64, 8, 3)],
    ("tf32", 512, True): [(32, 32, 32, 8, 2), (16, 32, 32, 8, 3)],
    ("tf32", 512, False): [(32, 32, 32, 8, 2), (16, 32, 32, 8, 3)],
    ("tf32", 256, True): [(64, 64, 32, 8, 3)],
    ("tf32", 256, False): [(64, 64, 32, 8, 3)],
    ("tf32", 128, True): [(64, 64, 32, 8, 3)],
    ("tf32", 128, False): [(128, 64, 32, 8, 3)],
    ("tf32", 64, True): [(64, 64, 32, 8, 3)],
    ("tf32", 64, False): [(64, 64, 32, 8, 3)],
    ("ieee", 256, True): [(16, 32, 16, 8, 2), (32, 16, 16, 8, 2)],
    ("ieee", 256, False): [(16, 32, 16, 8, 2), (32, 16, 16, 8, 2)],
    ("ieee", 128, True): [(32, 32, 16, 8, 2)],
    ("ieee", 128, False): [(32, 32, 16, 8, 2)],
    ("ieee", 64, True): [(32, 32, 16, 4, 2)],
    ("ieee", 64, False): [(32, 32, 16, 4, 2)],
}
_FINISH_BLOCKS = {"BLOCK_R": 16, "BLOCK_C": 64}  # elementwise: 1024 elements a program, 4 warps

# Under TRITON_INTERPRET=1 the autotuner is bypassed with these blocks (small, so that tests cover several tiles
# and slices of D), and the grids are sized for a device of _INTERPRET_SMS SMs, so that the sizes of the tests
# split the sweeps and merge the partial results.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 64}
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


def _block_d(kind, D):
    """Width of the backward's gradient slice: all of D (padded to a power of two, at least 64) where a clean
    config holds it, else the widest that does, at the cost of recomputing S once per slice."""
    if _interpreted():
        return _INTERPRET_BLOCKS["BLOCK_D"]
    return min(max(64, triton.next_power_of_2(D)), _BWD_BLOCK_D[kind])


def _sm_count(device):
    if _interpreted():
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# The grids. Each launch gets at least one program per SM where its tiles allow: the sweeps are split into runs
# that partial results (LSEs, gradient sums) merge exactly.
def _fwd_grid(M, N, block_m, block_n, sms):
    """(groups, splits): groups of row blocks that one program takes in turn (at most 2 per SM, so that the
    column LSE's workspace stays 2 x SMs x N), times splits of the column blocks."""
    groups = min(triton.cdiv(M, block_m), 2 * sms)
    return groups, min(triton.cdiv(N, block_n), triton.cdiv(sms, groups))


def _bwd_grid(M, N, D, block_m, block_n, block_d, sms):
    """(owners, splits, slices): blocks of owned columns, splits of the swept row blocks, and slices of D."""
    owners, slices = triton.cdiv(N, block_n), triton.cdiv(D, block_d)
    return owners, min(triton.cdiv(M, block_m), triton.cdiv(sms, owners * slices)), slices


def _kept(table, key, deterministic):
    """The configs a launch may run, as (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the interpreter's blocks, the
    table's first (deterministic: the same config, so the same sums, in every process) or all of them."""
    if _interpreted():
        b = _INTERPRET_BLOCKS
        return [(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], 1, 1)]
    return table[key][:1] if deterministic else table[key]


# UPCAST: the Triton 3.9 interpreter multiplies bf16 tiles as their raw uint16 bits, so there the dot operands
# are widened to fp32 first (exact: same products, same fp32 sums). Compiled out on the GPU. EVEN_K: every
# BLOCK_K divides 64.
def _fwd_constexprs(D, precision, col_lse):
    return dict(COL_LSE=col_lse, INPUT_PRECISION=precision, UPCAST=_interpreted(), EVEN_K=D % 64 == 0)


def _bwd_constexprs(D, precision, block_d, q_term, k_term, atomic):
    return dict(Q_TERM=q_term, K_TERM=k_term, ATOMIC=atomic, INPUT_PRECISION=precision, UPCAST=_interpreted(),
                EVEN_K=D % 64 == 0, EVEN_D=D % block_d == 0, BLOCK_D=block_d)


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in sorted({c for cs in table.values() for c in cs})]


def _as_tuple(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def _fwd_prune(configs, named_args, **kwargs):
    kept = _FWD_CONFIGS[_kind(named_args["Q"].dtype, kwargs["INPUT_PRECISION"])]
    return [c for c in configs if _as_tuple(c) in kept]


def _bwd_prune(configs, named_args, **kwargs):
    kept = _BWD_CONFIGS[_kind(named_args["Q"].dtype, kwargs["INPUT_PRECISION"]), kwargs["BLOCK_D"], kwargs["ATOMIC"]]
    return [c for c in configs if _as_tuple(c) in kept]


# The JIT kernels above stay undecorated (kernels.compile_check compiles them as they are); the launchers call
# these autotuned wrappers. Trial runs must not leave partial results behind: the forward's workspaces are
# restored (a config with fewer splits leaves the other rows at -inf), the backward's sums zeroed.
_lse_fwd = triton.autotune(configs=_configs(_FWD_CONFIGS), key=["M", "N", "D", "INPUT_PRECISION", "COL_LSE"],
                           prune_configs_by={"early_config_prune": _fwd_prune},
                           restore_value=["ROW_PART", "COL_PART"])(_lse_fwd_kernel)
_bwd = triton.autotune(configs=_configs(_BWD_CONFIGS),
                       key=["M", "N", "D", "INPUT_PRECISION", "Q_TERM", "K_TERM", "ATOMIC"],
                       prune_configs_by={"early_config_prune": _bwd_prune},
                       reset_to_zero=["DQ", "DK", "DS"])(_bwd_kernel)


def _launch(kernel, autotuned, kept, grid, args, meta):
    """Run kernel on args with grid(BLOCK_M, BLOCK_N): autotuned over kept, or with the one config kept."""
    if len(kept) > 1:
        autotuned[lambda c: grid(c["BLOCK_M"], c["BLOCK_N"])](*args, **meta)
        return
    (m, n, k, warps, stages), = kept
    blocks = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
    if _interpreted():
        kernel[grid(m, n)](*args, **meta, **blocks)
    else:
        kernel[grid(m, n)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)


def _merge(part):
    """The LSE over the rows of a (P, L) fp32 array of partial LSEs (-inf where a row has none), in place: the LSE
    of the partials' LSEs is the LSE of all their terms."""
    if part.shape[0] == 1:
        return part[0]
    hi = part.amax(0)  # (L,) finite: every column has a partial somewhere
    return part.sub_(hi).exp_().sum(0).log_().add_(hi)


def _lse(q, k, scale, col_lse, deterministic):
    """Row LSE of s q @ k.T (M,) and, if col_lse, its column LSE (N,); both fp32. Allocates the (splits, M) and
    (groups, N) fp32 workspaces of _fwd_grid, and two fp32 vectors each to merge them."""
    (M, D), N = q.shape, k.shape[0]
    precision = _input_precision(q.dtype)
    kept = _kept(_FWD_CONFIGS, _kind(q.dtype, precision), deterministic)
    sms = _sm_count(q.device)
    grids = [_fwd_grid(M, N, m, n, sms) for m, n, *_ in kept]
    # sized for the config with the most splits and groups; a config with fewer leaves the other rows at -inf
    row = torch.full((max(s for _, s in grids), M), -math.inf, device=q.device, dtype=torch.float32)
    col = torch.full((max(g for g, _ in grids), N), -math.inf, device=q.device, dtype=torch.float32) if col_lse else row
    assert max(row.numel(), col.numel()) < 2**31, "too large for the kernels' int32 offsets"
    _launch(_lse_fwd_kernel, _lse_fwd, kept, lambda m, n: _fwd_grid(M, N, m, n, sms), (q, k, scale, row, col, M, N, D),
            _fwd_constexprs(D, precision, col_lse))
    return _merge(row), _merge(col) if col_lse else None


def _sweep(q, k, scale, wq, lq, wk, lk, atomic, deterministic):
    """One launch of _bwd_kernel on S = s q @ k.T: (the columns' partial sums sum_i p_ij q_i, (parts, N, D) fp32;
    the rows' sums sum_j p_ij k_j, (M, D) fp32, if atomic; sum_ij p_ij S_ij / s, a 0-dim fp32 tensor)."""
    (M, D), N = q.shape, k.shape[0]
    precision = _input_precision(q.dtype)
    block_d = _block_d(_kind(q.dtype, precision), D)
    kept = _kept(_BWD_CONFIGS, (_kind(q.dtype, precision), block_d, atomic), deterministic)
    sms = _sm_count(q.device)
    grids = [_bwd_grid(M, N, D, m, n, block_d, sms) for m, n, *_ in kept]
    parts = 1 if atomic else max(s for _, s, _ in grids)  # zeros where a config with fewer splits writes none
    dk = torch.zeros(parts, N, D, device=q.device, dtype=torch.float32)
    dq = torch.zeros(M, D, device=q.device, dtype=torch.float32) if atomic else dk
    ds = torch.zeros(max(o * s for o, s, _ in grids), device=q.device, dtype=torch.float32)
    assert dk.numel() < 2**31 and dq.numel() < 2**31, "too large for the kernels' int32 offsets"
    dummy = scale  # never read: the matching term is compiled out
    args = (q, k, scale, dummy if wq is None else wq, dummy if lq is None else lq, dummy if wk is None else wk,
            dummy if lk is None else lk, dq, dk, ds, M, N, D)
    _launch(_bwd_kernel, _bwd, kept, lambda m, n: _bwd_grid(M, N, D, m, n, block_d, sms), args,
            _bwd_constexprs(D, precision, block_d, wq is not None, wk is not None, atomic))
    return dk, (dq if atomic else None), ds.sum()


def _finish(part, gscale, dim, dtype, w=None, diag=None):
    """The gradient (R, dim) in dtype from its fp32 partial sums (parts, R, D >= dim): gscale (sum - 2 w diag)."""
    parts, R, D = part.shape
    g = torch.empty(R, dim, device=part.device, dtype=dtype)
    grid = (triton.cdiv(R, _FINISH_BLOCKS["BLOCK_R"]), triton.cdiv(dim, _FINISH_BLOCKS["BLOCK_C"]))
    _finish_kernel[grid](part, g if diag is None else diag, gscale if w is None else w, gscale, g,
                         R, dim, D, parts, HAS_DIAG=diag is not None, **_FINISH_BLOCKS)
    return g


def _grads(q, k, scale, gscale, dim, dtype, wq=None, lq=None, wk=None, lk=None, q_diag=None, k_diag=None,
           need_k=True, deterministic=False):
    """Gradients of the loss through S = s q @ k.T, where p_ij = wq_i exp(S_ij - lq_i) + wk_j exp(S_ij - lk_j):
    (dq, dk or None, ds): dq = gscale (sum_j p_ij k_j - 2 wq_i q_diag_i), dk likewise on S.T, both (., dim) in
    dtype, and ds = sum_ij p_ij S_ij / s. One recompute of S gives both, the rows' sums added atomically; the
    deterministic path, and dq alone, sweep S once per gradient with the roles swapped."""
    if need_k and not deterministic:
        dk_sum, dq_sum, ds = _sweep(q, k, scale, wq, lq, wk, lk, atomic=True, deterministic=False)
        dq = _finish(dq_sum[None], gscale, dim, dtype, wq, q_diag)
        del dq_sum  # before dk is allocated
        return dq, _finish(dk_sum, gscale, dim, dtype, wk, k_diag), ds
    dq_parts, _, ds = _sweep(k, q, scale, wk, lk, wq, lq, atomic=False, deterministic=deterministic)
    dq = _finish(dq_parts, gscale, dim, dtype, wq, q_diag)
    del dq_parts
    if not need_k:
        return dq, None, ds
    dk_parts, _, _ = _sweep(q, k, scale, wq, lq, wk, lk, atomic=False, deterministic=deterministic)
    return dq, _finish(dk_parts, gscale, dim, dtype, wk, k_diag), ds


def launch_plan(n, N, D, dtype, sm_count, deterministic=False, gathered=None, all_grads=True):
    """Every kernel launch of one forward + backward of the fused loss, in order, as dicts: kernel; produces;
    programs, the fewest over the configs the launch may run; gemms, its similarity GEMMs (2 n N D FLOPs each).

    n rows against N columns of dimension D in dtype (fp32 follows torch.get_float32_matmul_precision(), as the
    kernels do) on a device of sm_count SMs. gathered: x_all, t_all are passed (default: when N != n; n == N
    with gathered=False is the square, one-GPU loss); all_grads: they need gradients. deterministic: the path
    taken under torch.use_deterministic_algorithms(True)."""
    gathered = N != n if gathered is None else gathered
    assert gathered or N == n, "the square loss has N == n"
    precision = _input_precision(dtype)
    kind, dp = _kind(dtype, precision), _padded_dim(D)
    block_d = _block_d(kind, dp)
    plan = []

    def forward(produces, rows, cols):
        kept = _kept(_FWD_CONFIGS, kind, deterministic)
        plan.append(dict(kernel="_lse_fwd_kernel", produces=produces, gemms=1,
                         programs=min(math.prod(_fwd_grid(rows, cols, m, nb, sm_count)) for m, nb, *_ in kept)))

    def sweep(produces, rows, cols, atomic):
        kept = _kept(_BWD_CONFIGS, (kind, block_d, atomic), deterministic)
        plan.append(dict(kernel="_bwd_kernel", produces=produces, gemms=triton.cdiv(dp, block_d) + 1 + atomic,
                         programs=min(math.prod(_bwd_grid(rows, cols, dp, m, nb, block_d, sm_count))
                                      for m, nb, *_ in kept)))

    def finish(produces, rows):
        blocks = triton.cdiv(rows, _FINISH_BLOCKS["BLOCK_R"]) * triton.cdiv(D, _FINISH_BLOCKS["BLOCK_C"])
        plan.append(dict(kernel="_finish_kernel", produces=produces, gemms=0, programs=blocks))

    def grads(q, k, q_rows, k_rows, need_k):  # as _grads runs them
        if need_k and not deterministic:
            sweep(f"{k} (and {q}, atomically)", q_rows, k_rows, True)
            finish(q, q_rows)
            finish(k, k_rows)
            return
        sweep(q, k_rows, q_rows, False)
        finish(q, q_rows)
        if need_k:
            sweep(k, q_rows, k_rows, False)
            finish(k, k_rows)

    if not gathered:
        forward("row and column LSE of s x.t", n, n)
        grads("dx", "dt", n, n, True)
    else:
        forward("row LSE of s x.t_all", n, N)
        forward("row LSE of s t.x_all", n, N)
        grads("dx", "dt_all", n, N, all_grads)
        grads("dt", "dx_all", n, N, all_grads)
    return plan


_ROWDOT_ROWS = 4096


def _rowdot(x, t):
    """x_i.t_i in fp32 (n,), _ROWDOT_ROWS rows at a time so that the fp32 copies stay small (12 rows D bytes)."""
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    for i in range(0, x.shape[0], _ROWDOT_ROWS):
        rows = slice(i, i + _ROWDOT_ROWS)
        torch.sum(x[rows].float() * t[rows].float(), -1, out=out[rows])
    return out


def _p_scale(w):
    """A power of two c with c max|w'| in (2^13, 2^14]: the backward multiplies p by c before rounding it to the
    input dtype (c p <= 2^15 < fp16's 65504), so that p = w'_i P_ij ~ 1/(2 n N) does not underflow fp16 at
    large n, and divides the gradient by c after. Exact in every dtype; (1,) fp32 on w's device."""
    top = w.abs().max().reshape(1)
    exponent = (14 - torch.ceil(torch.log2(top))).clamp(-64, 64)
    return torch.where(top > 0, torch.exp2(exponent), torch.ones_like(top))


def _pad(a):
    """a (rows, D) with zero columns up to the kernels' D (a copy only when D is not a multiple of 16)."""
    return F.pad(a, (0, _padded_dim(a.shape[1]) - a.shape[1])) if a.shape[1] % 16 else a


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
    def forward(ctx, x, t, logit_scale, w, x_all, t_all):
        # w: (n,) fp32 = weight / (2n), a constant. x_all is None selects the square case.
        deterministic = torch.are_deterministic_algorithms_enabled()
        scale = logit_scale.detach().float().reshape(1)
        if x_all is None:
            lse_xt, lse_tx = _lse(_pad(x), _pad(t), scale, True, deterministic)
        else:
            lse_xt, _ = _lse(_pad(x), _pad(t_all), scale, False, deterministic)
            lse_tx, _ = _lse(_pad(t), _pad(x_all), scale, False, deterministic)
        xt = _rowdot(x, t)  # (n,)
        loss = (w * (lse_xt + lse_tx - 2 * scale * xt)).sum()
        ctx.deterministic = deterministic
        ctx.save_for_backward(x, t, logit_scale, w, x_all, t_all, lse_xt, lse_tx, xt)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, t, logit_scale, w, x_all, t_all, lse_xt, lse_tx, xt = ctx.saved_tensors
        scale = logit_scale.detach().float().reshape(1)
        c = _p_scale(w)
        wc = w * c  # the kernels' weights; the gradient scale takes 1/c back
        gscale = (grad_loss.float() * scale).reshape(1) / c  # d loss / d (x_i.t_j) carries one factor s
        need_x_all, need_t_all = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        common = dict(dim=x.shape[1], dtype=x.dtype, deterministic=ctx.deterministic)
        if x_all is None:  # S = A: its rows give dx, its columns dt; p holds both softmax terms
            dx, dt, ds = _grads(_pad(x), _pad(t), scale, gscale, wq=wc, lq=lse_xt, wk=wc, lk=lse_tx, q_diag=t,
                                k_diag=x, **common)
            dx_all = dt_all = None
        else:  # A = s x @ t_all.T gives dx and dt_all, C = s t @ x_all.T gives dt and dx_all
            dx, dt_all, ds_a = _grads(_pad(x), _pad(t_all), scale, gscale, wq=wc, lq=lse_xt, q_diag=t,
                                      need_k=need_t_all, **common)
            dt, dx_all, ds_c = _grads(_pad(t), _pad(x_all), scale, gscale, wq=wc, lq=lse_tx, q_diag=x,
                                      need_k=need_x_all, **common)
            ds = ds_a + ds_c
        ds = grad_loss.float() * (ds / c - 2 * (w * xt).sum())
        dscale = ds.to(logit_scale.dtype).reshape(logit_scale.shape)
        return dx, dt, dscale, None, dx_all, dt_all


# --------------------------------------------------------------------------------------------------
# Public functions


def fused_available(device):
    """Whether the Triton kernels can run on this device: CUDA, or the CPU under TRITON_INTERPRET=1."""
    return torch.device(device).type == "cuda" or _interpreted()


# auto runs the reference below this many logits n N: there a few small GEMMs cost about what the kernels' ten
# launches do, and below 512 x 4096 not every launch would fill an H100. Retune from kernels.bench's rows.
AUTO_MIN_LOGITS = 512 * 4096


def choose_impl(n, N, D, dtype, device, impl="auto"):
    """(name, reason): which implementation gated_clip_loss runs on n rows against N columns of dimension D in
    dtype on device, "fused" or "reference". impl "fused" and "reference" are obeyed ("fused" raises
    RuntimeError where the kernels cannot run); "auto" takes the reference off CUDA (the interpreter is for
    tests), for dtypes or D the kernels lack, and while n N < AUTO_MIN_LOGITS; the kernels above."""
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
    if n * N < AUTO_MIN_LOGITS:
        return "reference", f"auto: {n} x {N} logits, fewer than {AUTO_MIN_LOGITS}"
    return "fused", f"auto: {n} x {N} logits, at least {AUTO_MIN_LOGITS}"


def gated_clip_loss(x, t, logit_scale, weight=None, *, x_all=None, t_all=None, offset=0, impl="auto"):
    """mean_i w_i (LSE_j(s x_i.t_all_j) - s x_i.t_i + LSE_j(s t_i.x_all_j) - s t_i.x_i) / 2.

    x, t: (n, D) L2-normalised features of this rank (float32, bfloat16 or float16, D <= 1024 for the kernels).
    logit_scale: the scale s (0-dim tensor, may require grad). weight: (n,) per-sample weights, a constant
    (no gradient flows to it). x_all, t_all: (N, D) gathered features, or both None for the single-GPU loss
    (= alip.contrastive_loss). offset: where this rank's rows sit in x_all, t_all (rows offset .. offset+n-1 are
    x and t, the positives' columns); only checked, since the positive pair x_i.t_i is taken from x and t.
    impl: "fused" (the Triton kernels), "reference" (gated_clip_loss_reference) or "auto" (choose_impl's rule).
    Returns a 0-dim fp32 tensor. Differentiable in x, t, x_all, t_all and logit_scale. Under
    torch.use_deterministic_algorithms(True) the kernels give the same bits on the same inputs.
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
    n = x.shape[0]
    w = (torch.ones(n, device=x.device) if weight is None else weight.detach().float()) / (2 * n)
    x, t = x.contiguous(), t.contiguous()  # the kernels index rows as row * D
    if x_all is not None:
        x_all, t_all = x_all.contiguous(), t_all.contiguous()
    return _GatedClipLoss.apply(x, t, logit_scale, w, x_all, t_all)
