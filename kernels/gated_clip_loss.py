"""
Fused gated CLIP loss: ALIP's symmetric, per-sample-weighted InfoNCE loss without a B x B matrix.

Math. x, t: this rank's n image and text features (unit norm); x_all, t_all: the N gathered rows, of which
rows offset .. offset+n-1 are this rank's (x_all = x, t_all = t on one GPU); s: the logit scale; w: the gate
weights (a constant); w'_i = w_i / (2n).

    A = s * x @ t_all.T   (n, N)  image -> text          C = s * t @ x_all.T   (n, N)  text -> image
    loss = sum_i w'_i (LSE_j A_ij + LSE_j C_ij - 2 s x_i.t_i)

The positive pair is the local x_i.t_i, so its gradient goes to x and t; x_all and t_all get only the softmax
terms, which an all_gather-with-grad returns to their owners: nothing is counted twice. (alip.contrastive_loss
takes the positive from t_all[offset + i] instead: the same value, and the same gradients once the gather is
differentiated.) `offset` is therefore only checked. With P = softmax_row(A), Q = softmax_row(C):

    dx = s (sum_j w'_i P_ij t_all_j - 2 w'_i t_i)          dt_all_j = s sum_i w'_i P_ij x_i
    dt = s (sum_j w'_i Q_ij x_all_j - 2 w'_i x_i)          dx_all_j = s sum_i w'_i Q_ij t_i
    ds = sum_ij w'_i (P_ij A_ij + Q_ij C_ij) / s - 2 sum_i w'_i x_i.t_i

Square case (no *_all): C = A.T, so LSE_j C_ij is the column LSE of A, one matrix serves both directions,
and dx_i = s (sum_j (w'_i P_ij + w'_j Q_ji) t_j - 2 w'_i t_i), dt likewise on A.T.

Kernels, both of the flash-attention kind: a (BLOCK_M, BLOCK_N) tile of q @ k.T is accumulated in fp32 over
D in chunks of BLOCK_K, used in registers, and dropped.
  _lse_fwd_kernel  a persistent grid of P programs (2 per SM on a GPU, 2 in the interpreter, at most one per row
                   block); program p takes row blocks p, p + P, ... and sweeps every column block with an online
                   softmax (a real running max, so logits near -s never underflow): the row LSE and, if asked,
                   in row p of a (P, N) fp32 workspace the LSE over all its rows of every column, merged tile by
                   tile. The launcher reduces the P partials in place to the column LSE.
  _bwd_kernel      a program per (BLOCK_M rows of q, BLOCK_D columns of the gradient) keeps a (BLOCK_M, BLOCK_D)
                   fp32 accumulator in registers and sweeps every column block: it recomputes the whole tile of
                   S (over all of D), forms p_ij = wq_i exp(S_ij - lq_i) + wk_j exp(S_ij - lk_j) (either term
                   optional) and adds p @ k[:, its columns]: dq_i = gs (sum_j p_ij k_j - 2 wq_i diag_i), and
                   sum_j p_ij q_i.k_j for ds. dx, dt, dt_all and dx_all are this kernel with the roles swapped.
Why D is split. The accumulator lives in registers: 64 x 512 fp32 is 128 KiB, half the register file of an SM,
and ptxas holds it next to the S tile without spilling (230-255 registers a thread); 64 x 1024 or 128 x 512
would be the whole file. Fewer rows would shrink it, but 16- or 32-row blocks give up wgmma (64 rows per
warpgroup) and read all of k once per 16-32 rows instead of 64. Splitting keeps the wide tiles and pays in
recomputed S: with sigma = cdiv(D, BLOCK_D) slices, one direction's backward costs sigma + 1 similarity GEMMs
instead of 2. BLOCK_D is D (padded to a power of two) up to 512 for bf16, fp16 and tf32, so sigma = 1 there,
and 2 at D = 768 or 1024. ieee fp32 has no tensor-core path: tl.dot runs on the FMA units with its operands in
registers, so its tiles are 16 or 32 rows and BLOCK_D is at most 256 (sigma = 2 at D = 512, 4 at 1024). The
configs are those that `python -m kernels.compile_check` proves free of spills on Triton 3.6 and 3.9.

Cost in similarity GEMMs (one = 2 n N D FLOPs: a sweep of tiles of S = q @ k.T, or of P @ k):
  square       forward 1 (row and column LSE from the same tiles) + backward 2 (sigma + 1) (dx: S and P @ t;
               dt: S.T and P.T @ x) = 5 at sigma = 1.  alip.contrastive_loss does 6 (two logit matrices and
               their two gradients each) but writes and reads several B x B matrices to do them.
  rectangular  A and C are different matrices: forward 2 + backward 4 (sigma + 1) (half of it when x_all,
               t_all need no grad). x_all is x and t_all is t (one GPU in alip.py) selects the square path.
The two ALIP paths (raw text, caption) are two calls. They share x, but the kernels are bound by the GEMMs,
not by loading x (a (128, D) row block is read once per 128 x N tiles), so fusing them would save no GEMM.
Bytes moved: each program reads its rows and all N rows of k (from L2) per row block, so HBM traffic is
O((n + N) D) plus L2 traffic O(sigma cdiv(n, BLOCK_M) N D); writes are the (n, D) / (N, D) gradients in the
input dtype, the workspace and a few fp32 vectors of length n or N. No B x B matrix.
Extra memory, beyond the inputs and the gradients, of forward + backward (tests/test_kernels.py checks it):
    <= 4 P N (square only: the workspace) + 32 n + 4 N (LSE, weights, x_i.t_i, ds) + 12 min(n, 4096) D
       (fp32 copies of 4096 rows of x and t for x_i.t_i) bytes, P <= 2 x the SM count.
At B = n = N = 1,048,576, D = 512, bf16 on a 132-SM H100 or H200 (P = 264): 1,107,296,256 + 33,554,432 +
4,194,304 + 25,165,824 = 1,170,210,816 bytes (1.09 GiB), next to 2 GiB of inputs and 2 GiB of gradients
(partials per row block of 128, 4 N cdiv(n, 128) bytes, would be 32 GiB there). The first call of a shape on a
GPU also autotunes, which restores a copy of the workspace between trial runs.

Precision. Scores, softmax sums and gradients accumulate in fp32. bf16/fp16 inputs: exact products, fp32
sums; P is rounded to the input dtype for the P @ k GEMM, as in flash attention, and each gradient is rounded
once to the input dtype. fp32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's
default) -> ieee fp32 GEMMs, "high"/"medium" -> tf32 (what the PyTorch reference does under the same setting).
ds is summed in fp32 before P is rounded: the softmax and positive terms nearly cancel when all logits are equal.
p = w'_i P_ij is about w / (2 n N), which fp16 cannot hold at large n (below half its smallest subnormal, 3e-8,
from about n = N = 4096 on for w = 1); so the kernels get the weights times a power of two c, c max|w'| in
(2^13, 2^14] (c |p| <= 2^15 < 65504), and the gradient scale divided by c: exact, and p keeps fp16's 11 bits
down to 2^-29 of the largest p.
Max error / max |value| against float64 on the same rounded inputs (Triton interpreter, B = 200, D = 64, s = 100,
weights in [0, 2), two seeds; the interpreter computes fp32 GEMMs in ieee):
    fp32  loss 6e-8, gradients <= 3e-6       bf16  loss 3e-8, gradients <= 7.4e-3 (one bf16 rounding)
    fp16  loss 5e-8, gradients <= 3.4e-4     ds    <= 3e-7 in every dtype
tf32 (GPU only, not measured here): rounding the inputs alone moves the gradients by ~6e-4 and the loss by ~1e-6
relative (B = 2048, D = 512, s = 100, float64 emulation); tests/test_kernels.py::test_tf32 allows 2e-2.
"""

import math
import os

import torch
import triton
import triton.language as tl

MAX_D = 1024  # the largest D that kernels.compile_check covers (the backward splits D in slices)


# --------------------------------------------------------------------------------------------------
# Plain PyTorch reference (also the CPU fallback)


def gated_clip_loss_reference(x, t, logit_scale, weight=None, *, x_all=None, t_all=None, offset=0):
    """The loss above, materialising the (n, N) logits. Equals alip.contrastive_loss without *_all."""
    x_all = x if x_all is None else x_all
    t_all = t if t_all is None else t_all
    acc = torch.promote_types(x.dtype, torch.float32)  # 16-bit inputs: LSE in fp32
    logits_xt = logit_scale * (x @ t_all.T).to(acc)  # (n, N)
    logits_tx = logit_scale * (t @ x_all.T).to(acc)  # (n, N)
    pos = logit_scale * (x.to(acc) * t.to(acc)).sum(-1)  # (n,)
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
    ROW_LSE,   # (M,) fp32 out: LSE_j s q_i.k_j
    COL_PART,  # (programs, N) fp32, -inf on entry, used only if COL_LSE: per program, LSE over its rows of s q_i.k_j
    M, N, D,
    COL_LSE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    scale = tl.load(SCALE)
    # persistent: program pid takes row blocks pid, pid + programs, ...; its first is pid
    for rb in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running row max
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(score - m_i)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            _, a = _scores(Q, K, rows, cols, row_ok, col_ok, D, scale,
                           INPUT_PRECISION, UPCAST, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(a, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(a - m_new[:, None]), 1)
            m_i = m_new
            if COL_LSE:
                # every row block holds at least one real row, so the block's column sum is >= 1 on real
                # columns; merged into this program's LSE over its earlier row blocks (-inf before its first)
                c_max = tl.max(a, 0)
                c_lse = c_max + tl.log(tl.sum(tl.exp(a - c_max[None, :]), 0))
                old = tl.load(COL_PART + pid * N + cols, mask=col_ok, other=0.0)
                hi = tl.maximum(old, c_lse)
                tl.store(COL_PART + pid * N + cols, hi + tl.log(tl.exp(old - hi) + tl.exp(c_lse - hi)), mask=col_ok)
        tl.store(ROW_LSE + rows, m_i + tl.log(l_i), mask=row_ok)
        if COL_LSE:
            tl.debug_barrier()  # this block's column stores are seen by every thread before the next block reads


@triton.jit
def _bwd_kernel(
    Q,      # (M, D) rows (the tensor whose gradient G is), contiguous
    K,      # (N, D) columns, contiguous, same dtype
    SCALE,  # (1,) fp32, the logit scale s
    WQ,     # (M,) fp32 weights c w' of the rows, read if Q_TERM
    LQ,     # (M,) fp32 row LSE of s q.k^T, read if Q_TERM
    WK,     # (N,) fp32 weights c w' of the columns, read if K_TERM
    LK,     # (N,) fp32 column LSE of s q.k^T (the row LSE of the transposed matrix), read if K_TERM
    DIAG,   # (M, D) positive partner of each row (t for rows of x, x for rows of t), read if HAS_DIAG
    GSCALE, # (1,) fp32, grad_loss * s / c
    G,      # (M, D) out, Q's dtype: GSCALE * (sum_j p_ij k_j - 2 wq_i diag_i)
    DS,     # (M,) fp32 out: sum_j p_ij q_i.k_j
    M, N, D,
    Q_TERM: tl.constexpr, K_TERM: tl.constexpr, HAS_DIAG: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program = (row block, slice of BLOCK_D gradient columns); the slices of one row block are neighbours,
    # so they read the same q and k tiles at about the same time (from L2)
    slices = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    rows = (pid // slices) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = (pid % slices) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = (dims < D) | EVEN_D
    scale = tl.load(SCALE)
    if Q_TERM:
        wq = tl.load(WQ + rows, mask=row_ok, other=0.0)
        lq = tl.load(LQ + rows, mask=row_ok, other=0.0)
    out_ok = row_ok[:, None] & dim_ok[None, :]
    if HAS_DIAG:  # the positive pair appears in both directions: -2 w'_i diag_i (wq is c w' when HAS_DIAG);
        # it starts the accumulator so that no second (BLOCK_M, BLOCK_D) tile is live next to it
        diag = tl.load(DIAG + rows[:, None] * D + dims[None, :], mask=out_ok, other=0.0)
        acc = -2 * wq[:, None] * diag.to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # k's slice first: with this load at the top of the loop, Triton software-pipelines the chunks of S
        k = tl.load(K + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        # the whole tile of S (all of D), whichever slice of the gradient this program owns
        qk, a = _scores(Q, K, rows, cols, row_ok, col_ok, D, scale,
                        INPUT_PRECISION, UPCAST, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        # exponents are <= 0 up to rounding (an LSE bounds every score it contains); padding gives exp = 0
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if Q_TERM:
            p += wq[:, None] * tl.exp(a - lq[:, None])
        if K_TERM:
            wk = tl.load(WK + cols, mask=col_ok, other=0.0)
            lk = tl.load(LK + cols, mask=col_ok, other=0.0)
            p += wk[None, :] * tl.exp(a - lk[None, :])
        # d loss / d s, summed before p is rounded: sum_j p_ij = c w'_i nearly cancels the positive pair
        ds += tl.sum(p * qk, 1)
        p = p.to(k.dtype)
        if UPCAST:
            p, k = p.to(tl.float32), k.to(tl.float32)
        acc = tl.dot(p, k, acc, input_precision=INPUT_PRECISION)
    acc *= tl.load(GSCALE)
    tl.store(G + rows[:, None] * D + dims[None, :], acc.to(G.dtype.element_ty), mask=out_ok)
    if pid % slices == 0:  # every slice computes the same ds
        tl.store(DS + rows, ds, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Launchers

# Configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by input kind: "16bit" (bf16, fp16), "tf32" and
# "ieee" (fp32 under torch.get_float32_matmul_precision() "high"/"medium" and "highest"); the backward's also by
# BLOCK_D, the width of the gradient slice one program accumulates, which _block_d picks. These are the
# candidates that ptxas compiles for sm_90 with no spill and within an H100 block's 227 KiB of shared memory, on
# Triton 3.6 and 3.9 alike, for D = 64 .. 1024: `python -m kernels.compile_check` compiles them all and fails
# otherwise. They are measured, not modelled: most use 230-255 registers, where no simple count of tiles
# predicts whether ptxas spills.
_FWD_CONFIGS = {
    "16bit": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3)],
    "tf32": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],
    "ieee": [(64, 32, 16, 4, 2)],
}
_BWD_BLOCK_D = {"16bit": 512, "tf32": 512, "ieee": 256}  # the widest slice a clean config holds
_BWD_CONFIGS = {
    ("16bit", 512): [(64, 32, 64, 8, 3), (64, 64, 64, 8, 2)],
    ("16bit", 256): [(128, 32, 64, 8, 3), (64, 64, 64, 8, 3)],
    ("16bit", 128): [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
    ("tf32", 512): [(64, 16, 32, 8, 2)],
    ("tf32", 256): [(64, 64, 64, 8, 2), (64, 32, 32, 8, 2)],
    ("tf32", 128): [(128, 64, 32, 8, 2), (64, 64, 64, 4, 2)],
    ("ieee", 256): [(16, 16, 16, 4, 2), (32, 16, 16, 8, 2)],
    ("ieee", 128): [(32, 16, 16, 4, 2)],
}

# Under TRITON_INTERPRET=1 the autotuner is bypassed with these blocks (small, so tests cover several tiles and
# slices of D) and the forward runs this many persistent programs (fewer than the row blocks, so that each
# sweeps several).
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32}
_INTERPRET_PROGRAMS = 2


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


def _block_d(kind, D):
    """Width of the backward's gradient slice: all of D (padded to a power of two, at least 128) where a clean
    config holds it, else the widest that does, at the cost of recomputing S once per slice."""
    if _interpreted():
        return _INTERPRET_BLOCKS["BLOCK_D"]
    return min(max(128, triton.next_power_of_2(D)), _BWD_BLOCK_D[kind])


# UPCAST: the Triton 3.9 interpreter multiplies bf16 tiles as their raw uint16 bits, so there the dot operands
# are widened to fp32 first (exact: same products, same fp32 sums). Compiled out on the GPU. EVEN_K: every
# BLOCK_K divides 64.
def _fwd_constexprs(D, precision, col_lse):
    return dict(COL_LSE=col_lse, INPUT_PRECISION=precision, UPCAST=_interpreted(), EVEN_K=D % 64 == 0)


def _bwd_constexprs(D, precision, block_d, q_term, k_term, has_diag):
    return dict(Q_TERM=q_term, K_TERM=k_term, HAS_DIAG=has_diag, INPUT_PRECISION=precision, UPCAST=_interpreted(),
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
    kept = _BWD_CONFIGS[_kind(named_args["Q"].dtype, kwargs["INPUT_PRECISION"]), kwargs["BLOCK_D"]]
    return [c for c in configs if _as_tuple(c) in kept]


# The JIT kernels above stay undecorated (kernels.compile_check compiles them as they are); the launchers call
# these autotuned wrappers. The forward merges into COL_PART, so autotuning restores it between trial runs.
_lse_fwd = triton.autotune(configs=_configs(_FWD_CONFIGS), key=["M", "N", "D", "INPUT_PRECISION", "COL_LSE"],
                           prune_configs_by={"early_config_prune": _fwd_prune}, restore_value=["COL_PART"])(_lse_fwd_kernel)
_bwd = triton.autotune(configs=_configs(_BWD_CONFIGS),
                       key=["M", "N", "D", "INPUT_PRECISION", "Q_TERM", "K_TERM", "HAS_DIAG"],
                       prune_configs_by={"early_config_prune": _bwd_prune})(_bwd_kernel)


def _programs(device, rows):
    """The forward's persistent grid: 2 programs per SM on a GPU (one wave at two per SM),
    _INTERPRET_PROGRAMS in the interpreter, never more than there are row blocks of the smallest BLOCK_M."""
    if _interpreted():
        return min(_INTERPRET_PROGRAMS, triton.cdiv(rows, _INTERPRET_BLOCKS["BLOCK_M"]))
    block_m = min(m for cs in _FWD_CONFIGS.values() for m, *_ in cs)
    return min(2 * torch.cuda.get_device_properties(device).multi_processor_count, triton.cdiv(rows, block_m))


def _lse(q, k, scale, col_lse=False):
    """Row LSE of s q @ k.T (M,) and, if col_lse, its column LSE (N,); both fp32.
    Allocates 4 M + (4 P N + 8 N if col_lse) bytes, P = _programs(M)."""
    (M, D), N = q.shape, k.shape[0]
    precision = _input_precision(q.dtype)
    row = torch.empty(M, device=q.device, dtype=torch.float32)
    programs = _programs(q.device, M)
    # a program's row stays -inf where it meets no row block (fewer of them at the chosen BLOCK_M)
    part = torch.full((programs, N), -math.inf, device=q.device, dtype=torch.float32) if col_lse else row
    assert part.numel() < 2**31, "too large for the kernels' int32 offsets"
    args = (q, k, scale, row, part, M, N, D)
    meta = _fwd_constexprs(D, precision, col_lse)
    if _interpreted():
        blocks = {b: _INTERPRET_BLOCKS[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        _lse_fwd_kernel[(programs,)](*args, **meta, **blocks)
    else:
        _lse_fwd[lambda c: (min(programs, triton.cdiv(M, c["BLOCK_M"])),)](*args, **meta)
    if not col_lse:
        return row, None
    hi = part.amax(0)  # (N,), finite: every column has a real row in some program
    return row, part.sub_(hi).exp_().sum(0).log_().add_(hi)  # in place: no second (P, N) buffer


def _grad(q, k, scale, gscale, wq=None, lq=None, wk=None, lk=None, diag=None):
    """The gradient of q, gscale * (sum_j p_ij k_j - 2 wq_i diag_i) (M, D) in q's dtype, and sum_j p_ij q_i.k_j
    (M,) fp32, where S = s q @ k.T and p_ij = wq_i exp(S_ij - lq_i) + wk_j exp(S_ij - lk_j).
    Allocates the gradient and 4 M bytes."""
    (M, D), N = q.shape, k.shape[0]
    precision = _input_precision(q.dtype)
    block_d = _block_d(_kind(q.dtype, precision), D)
    g = torch.empty_like(q)
    ds = torch.empty(M, device=q.device, dtype=torch.float32)
    dummy = scale  # never read: the matching term is compiled out
    args = (q, k, scale, dummy if wq is None else wq, dummy if lq is None else lq,
            dummy if wk is None else wk, dummy if lk is None else lk, q if diag is None else diag, gscale, g, ds, M, N, D)
    meta = _bwd_constexprs(D, precision, block_d, wq is not None, wk is not None, diag is not None)
    slices = triton.cdiv(D, block_d)
    if _interpreted():
        blocks = {b: _INTERPRET_BLOCKS[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        _bwd_kernel[(triton.cdiv(M, blocks["BLOCK_M"]) * slices,)](*args, **meta, **blocks)
    else:
        _bwd[lambda c: (triton.cdiv(M, c["BLOCK_M"]) * slices,)](*args, **meta)
    return g, ds


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
    assert max(a.numel() for a in tensors) < 2**31, "too large for the kernels' int32 offsets"


# --------------------------------------------------------------------------------------------------
# Autograd


class _GatedClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, logit_scale, w, x_all, t_all):
        # w: (n,) fp32 = weight / (2n), a constant. x_all is None selects the square case.
        scale = logit_scale.detach().float().reshape(1)
        if x_all is None:
            lse_xt, lse_tx = _lse(x, t, scale, col_lse=True)
        else:
            lse_xt, _ = _lse(x, t_all, scale)
            lse_tx, _ = _lse(t, x_all, scale)
        xt = _rowdot(x, t)  # (n,)
        loss = (w * (lse_xt + lse_tx - 2 * scale * xt)).sum()
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
        if x_all is None:
            dx, ds_x = _grad(x, t, scale, gscale, wq=wc, lq=lse_xt, wk=wc, lk=lse_tx, diag=t)  # rows of A
            dt, _ = _grad(t, x, scale, gscale, wq=wc, lq=lse_tx, wk=wc, lk=lse_xt, diag=x)  # rows of A.T
            ds = ds_x.sum()  # sum_ij dA_ij A_ij / s: the rows of A hold both softmax terms
        else:
            dx, ds_x = _grad(x, t_all, scale, gscale, wq=wc, lq=lse_xt, diag=t)  # rows of A
            dt, ds_t = _grad(t, x_all, scale, gscale, wq=wc, lq=lse_tx, diag=x)  # rows of C
            ds = ds_x.sum() + ds_t.sum()
        dt_all = _grad(t_all, x, scale, gscale, wk=wc, lk=lse_xt)[0] if need_t_all else None  # columns of A
        dx_all = _grad(x_all, t, scale, gscale, wk=wc, lk=lse_tx)[0] if need_x_all else None  # columns of C
        ds = grad_loss.float() * (ds / c - 2 * (w * xt).sum())
        dscale = ds.to(logit_scale.dtype).reshape(logit_scale.shape)
        return dx, dt, dscale, None, dx_all, dt_all


# --------------------------------------------------------------------------------------------------
# Public function


def fused_available(device):
    """Whether gated_clip_loss runs the Triton kernels on this device (else the PyTorch reference)."""
    return torch.device(device).type == "cuda" or _interpreted()


def gated_clip_loss(x, t, logit_scale, weight=None, *, x_all=None, t_all=None, offset=0):
    """mean_i w_i (LSE_j(s x_i.t_all_j) - s x_i.t_i + LSE_j(s t_i.x_all_j) - s t_i.x_i) / 2, fused.

    x, t: (n, D) L2-normalised features of this rank (float32, bfloat16 or float16, D <= 1024).
    logit_scale: the scale s (0-dim tensor, may require grad). weight: (n,) per-sample weights, a constant
    (no gradient flows to it). x_all, t_all: (N, D) gathered features, or both None for the single-GPU loss
    (= alip.contrastive_loss). offset: where this rank's rows sit in x_all, t_all (rows offset .. offset+n-1 are
    x and t, the positives' columns); only checked, since the positive pair x_i.t_i is taken from x and t.
    Returns a 0-dim fp32 tensor. Differentiable in x, t, x_all, t_all and logit_scale. Runs the Triton kernels
    on CUDA (and on CPU under TRITON_INTERPRET=1), the PyTorch reference elsewhere.
    """
    fused = fused_available(x.device)
    _check_inputs(x, t, logit_scale, weight, x_all, t_all, offset, fused)
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=x.device)
    if not fused:
        return gated_clip_loss_reference(x, t, logit_scale, weight, x_all=x_all, t_all=t_all, offset=offset)
    if x_all is x and t_all is t:  # the gathered features are the local ones: one matrix serves both directions
        x_all = t_all = None
    n = x.shape[0]
    w = (torch.ones(n, device=x.device) if weight is None else weight.detach().float()) / (2 * n)
    x, t = x.contiguous(), t.contiguous()  # the kernels index rows as row * D
    if x_all is not None:
        x_all, t_all = x_all.contiguous(), t_all.contiguous()
    return _GatedClipLoss.apply(x, t, logit_scale, w, x_all, t_all)
