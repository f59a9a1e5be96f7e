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
  _lse_fwd_kernel  a program per BLOCK_M rows of q sweeps every column block with an online softmax (a real
                   running max, so logits near -s never underflow): the row LSE, and, if asked, per row block
                   the LSE of every column over the block's rows; torch.logsumexp over those cdiv(n, 128) x N
                   partials gives the column LSE.
  _bwd_kernel      a program per BLOCK_M rows of q keeps a (BLOCK_M, D) fp32 accumulator in registers:
                   dq_i = gs (sum_j p_ij k_j - 2 wq_i diag_i), p_ij = wq_i exp(S_ij - lq_i) + wk_j exp(S_ij - lk_j)
                   (either term optional), and sum_j p_ij q_i.k_j for ds. dx, dt, dt_all and dx_all are this
                   kernel with the roles swapped. The autotuner also chooses whether the q block stays resident
                   in shared memory (S then comes from the same full-width k tile as P @ k) or S is summed over
                   chunks of D like the forward (less shared memory, twice the k loads).

Cost in similarity GEMMs (one = 2 n N D FLOPs: a sweep of tiles of S = q @ k.T, or of P @ k):
  square       forward 1 (row and column LSE from the same tiles) + backward 4 (dx: S and P @ t; dt: S.T and
               P.T @ x) = 5.  alip.contrastive_loss does 6 (two logit matrices and their two gradients each)
               but writes and reads several B x B matrices to do them.
  rectangular  A and C are different matrices: forward 2 + backward 8 (4 when x_all, t_all need no grad).
               x_all is x and t_all is t (one GPU in alip.py) selects the square path.
The two ALIP paths (raw text, caption) are two calls. They share x, but the kernels are bound by the GEMMs,
not by loading x (a (128, D) row block is read once per 128 x N tiles), so fusing them would save no GEMM.
Bytes moved: each program reads its rows once and all N rows of k (from L2), so HBM traffic is
O((n + N) D + cdiv(n, BLOCK_M) N D); writes are the (n, D) / (N, D) gradients in the input dtype, 4 N cdiv(n, 128)
bytes of column partials (32 MiB at B = 32768) and a few fp32 vectors of length n or N. No B x B matrix.

Precision. Scores, softmax sums and gradients accumulate in fp32. bf16/fp16 inputs: exact products, fp32
sums; P is rounded to the input dtype for the P @ k GEMM, as in flash attention, and each gradient is rounded
once to the input dtype. fp32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's
default) -> ieee fp32 GEMMs, "high"/"medium" -> tf32 (what the PyTorch reference does under the same setting).
ds is summed in fp32 before P is rounded: the softmax and positive terms nearly cancel when all logits are equal.
Max error / max |value| against float64 on the same rounded inputs (Triton interpreter, B = 200, D = 64, s = 100;
the interpreter computes fp32 GEMMs in ieee):
    fp32  loss 1e-7, gradients <= 6e-6       bf16  loss 5e-8, gradients <= 9e-3 (one bf16 rounding)
    fp16  loss 1e-7, gradients <= 6e-4       ds    <= 3e-7 in every dtype
tf32 (GPU only, not measured here): rounding the inputs alone moves the gradients by ~6e-4 and the loss by ~1e-6
relative (B = 2048, D = 512, s = 100, float64 emulation); tests/test_kernels.py::test_tf32 allows 2e-2.
"""

import math
import os

import torch
import triton
import triton.language as tl

MAX_D = 1024  # the backward keeps a (BLOCK_M, next_pow2(D)) fp32 accumulator in registers


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


def _fwd_prune(configs, named_args, **kwargs):
    """Drop configs whose pipelined q/k chunks would not fit in shared memory (~227 KB on H100)."""
    size = named_args["Q"].element_size()
    fits = [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * size <= 160 * 1024]
    return fits or configs[-1:]


@triton.autotune(
    configs=[
        # BLOCK_M = 128 throughout: the column partials take 4 N cdiv(M, 128) bytes
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ],
    key=["M", "N", "D"],
    prune_configs_by={"early_config_prune": _fwd_prune},
)
@triton.jit
def _lse_fwd_kernel(
    Q,         # (M, D) rows of the similarity matrix (x or t), contiguous
    K,         # (N, D) its columns (t_all or x_all), contiguous, same dtype
    SCALE,     # (1,) fp32, the logit scale s
    ROW_LSE,   # (M,) fp32 out: LSE_j s q_i.k_j
    COL_PART,  # (cdiv(M, BLOCK_M), N) fp32 out, written only if COL_LSE: LSE over this block's rows of s q_i.k_j
    M, N, D,
    COL_LSE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    scale = tl.load(SCALE)
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
            # every row block holds at least one real row, so c_sum >= 1 on real columns
            c_max = tl.max(a, 0)
            c_sum = tl.sum(tl.exp(a - c_max[None, :]), 0)
            tl.store(COL_PART + pid * N + cols, c_max + tl.log(c_sum), mask=col_ok)
    tl.store(ROW_LSE + rows, m_i + tl.log(l_i), mask=row_ok)


def _bwd_prune(configs, named_args, **kwargs):
    """Keep configs whose fp32 accumulator (BLOCK_M, D_PAD) and p tile (BLOCK_M, BLOCK_N) take <= 144 registers
    a thread (ptxas for sm_90 spills beyond that, 255 being the limit), whose k tile (and resident q block) fit
    in shared memory, and that are not needlessly small; the last config fits every D up to MAX_D."""
    size = named_args["Q"].element_size()
    d_pad = max(16, triton.next_power_of_2(named_args["D"]))
    fits = [c for c in configs
            if c.kwargs["BLOCK_M"] * (d_pad + c.kwargs["BLOCK_N"]) <= 144 * 32 * c.num_warps
            and (c.kwargs["BLOCK_N"] + c.kwargs["Q_RESIDENT"] * c.kwargs["BLOCK_M"]) * d_pad * size <= 128 * 1024
            and c.kwargs["BLOCK_M"] * d_pad >= 64 * 64]
    return fits or configs[-1:]


@triton.autotune(
    configs=[
        # Q_RESIDENT: the (BLOCK_M, D) q block is loaded once and S comes from the same full-width k tile as
        # P @ k (half the loads, more shared memory); otherwise S is summed over BLOCK_K chunks of D.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "Q_RESIDENT": False}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": True}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": True}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "Q_RESIDENT": True}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "Q_RESIDENT": True}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "Q_RESIDENT": False}, num_warps=4, num_stages=1),
    ],
    key=["M", "N", "D"],
    prune_configs_by={"early_config_prune": _bwd_prune},
)
@triton.jit
def _bwd_kernel(
    Q,      # (M, D) rows (the tensor whose gradient G is), contiguous
    K,      # (N, D) columns, contiguous, same dtype
    SCALE,  # (1,) fp32, the logit scale s
    WQ,     # (M,) fp32 weights w' of the rows, read if Q_TERM
    LQ,     # (M,) fp32 row LSE of s q.k^T, read if Q_TERM
    WK,     # (N,) fp32 weights w' of the columns, read if K_TERM
    LK,     # (N,) fp32 column LSE of s q.k^T (the row LSE of the transposed matrix), read if K_TERM
    DIAG,   # (M, D) positive partner of each row (t for rows of x, x for rows of t), read if HAS_DIAG
    GSCALE, # (1,) fp32, grad_loss * s
    G,      # (M, D) out, Q's dtype: GSCALE * (sum_j p_ij k_j - 2 wq_i diag_i)
    DS,     # (M,) fp32 out: sum_j p_ij q_i.k_j
    M, N, D,
    Q_TERM: tl.constexpr, K_TERM: tl.constexpr, HAS_DIAG: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, Q_RESIDENT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dims = tl.arange(0, D_PAD)
    dim_ok = (dims < D) | EVEN_D
    scale = tl.load(SCALE)
    if Q_TERM:
        wq = tl.load(WQ + rows, mask=row_ok, other=0.0)
        lq = tl.load(LQ + rows, mask=row_ok, other=0.0)
    out_ok = row_ok[:, None] & dim_ok[None, :]
    if HAS_DIAG:  # the positive pair appears in both directions: -2 w'_i diag_i (wq is w' when HAS_DIAG);
        # it starts the accumulator so that no second (BLOCK_M, D_PAD) tile is live next to it
        diag = tl.load(DIAG + rows[:, None] * D + dims[None, :], mask=out_ok, other=0.0)
        acc = -2 * wq[:, None] * diag.to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    if Q_RESIDENT:
        q = tl.load(Q + rows[:, None] * D + dims[None, :], mask=out_ok, other=0.0)  # (BLOCK_M, D_PAD)
        if UPCAST:
            q = q.to(tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.load(K + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if Q_RESIDENT:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=INPUT_PRECISION)
            a = tl.where(row_ok[:, None] & col_ok[None, :], qk * scale, -1.0e30)
        else:
            qk, a = _scores(Q, K, rows, cols, row_ok, col_ok, D, scale,
                            INPUT_PRECISION, UPCAST, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        # a: (BLOCK_M, BLOCK_N) scores, padding -1e30
        # exponents are <= 0 up to rounding (an LSE bounds every score it contains); padding gives exp = 0
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if Q_TERM:
            p += wq[:, None] * tl.exp(a - lq[:, None])
        if K_TERM:
            wk = tl.load(WK + cols, mask=col_ok, other=0.0)
            lk = tl.load(LK + cols, mask=col_ok, other=0.0)
            p += wk[None, :] * tl.exp(a - lk[None, :])
        # d loss / d s, summed before p is rounded: sum_j p_ij = w'_i nearly cancels the positive pair
        ds += tl.sum(p * qk, 1)
        p = p.to(k.dtype)
        if UPCAST:
            p, k = p.to(tl.float32), k.to(tl.float32)
        acc = tl.dot(p, k, acc, input_precision=INPUT_PRECISION)
    acc *= tl.load(GSCALE)
    tl.store(G + rows[:, None] * D + dims[None, :], acc.to(G.dtype.element_ty), mask=out_ok)
    tl.store(DS + rows, ds, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Launchers

# Under TRITON_INTERPRET=1 the autotuner is bypassed with these blocks (small, so tests cover many tiles).
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "Q_RESIDENT": False}


def _interpreted():
    """True when the kernels were decorated under TRITON_INTERPRET=1 and the flag is still set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and type(_bwd_kernel.fn).__name__ == "InterpretedFunction"


def _input_precision(dtype):
    if dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit inputs
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check(q, k):
    assert q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1], f"shapes {tuple(q.shape)} {tuple(k.shape)}"
    assert q.dtype == k.dtype and q.dtype in (torch.float32, torch.bfloat16, torch.float16), \
        f"dtypes {q.dtype} {k.dtype}: need one of float32, bfloat16, float16 for both"
    assert q.device == k.device, f"devices {q.device} {k.device}"
    assert q.is_contiguous() and k.is_contiguous(), "features must be contiguous (row-major)"
    assert 1 <= q.shape[1] <= MAX_D, f"feature dim {q.shape[1]} outside 1..{MAX_D}"
    assert max(q.numel(), k.numel()) < 2**31, "too large for the kernels' int32 offsets"


def _launch(kernel, grid_rows, args, **constexprs):
    # The Triton 3.9 interpreter multiplies bf16 tiles as their raw uint16 bits, so there the dot operands are
    # widened to fp32 first (exact: same products, same fp32 sums). Compiled out on the GPU.
    constexprs["UPCAST"] = _interpreted()
    if _interpreted():
        grid = (triton.cdiv(grid_rows, _INTERPRET_BLOCKS["BLOCK_M"]),)
        kernel.fn[grid](*args, **constexprs, **{k: v for k, v in _INTERPRET_BLOCKS.items() if k in kernel.fn.arg_names})
    else:
        kernel[lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M"]),)](*args, **constexprs)


def _lse(q, k, scale, col_lse=False):
    """Row LSE of s q @ k.T (M,) and, if col_lse, its column LSE (N,); both fp32."""
    _check(q, k)
    (M, D), N = q.shape, k.shape[0]
    row = torch.empty(M, device=q.device, dtype=torch.float32)
    # sized for the smallest BLOCK_M the launch may pick; the kernel writes the first cdiv(M, BLOCK_M) rows
    block_m = _INTERPRET_BLOCKS["BLOCK_M"] if _interpreted() else min(c.kwargs["BLOCK_M"] for c in _lse_fwd_kernel.configs)
    part = torch.full((triton.cdiv(M, block_m) if col_lse else 1, N), -math.inf, device=q.device, dtype=torch.float32)
    assert part.numel() < 2**31, "too large for the kernels' int32 offsets"
    _launch(_lse_fwd_kernel, M, (q, k, scale, row, part, M, N, D),
            COL_LSE=col_lse, INPUT_PRECISION=_input_precision(q.dtype), EVEN_K=D % 64 == 0)
    return row, (torch.logsumexp(part, 0) if col_lse else None)


def _grad(q, k, scale, gscale, wq=None, lq=None, wk=None, lk=None, diag=None):
    """The gradient of q, gscale * (sum_j p_ij k_j - 2 wq_i diag_i) (M, D) in q's dtype, and sum_j p_ij q_i.k_j
    (M,) fp32, where S = s q @ k.T and p_ij = wq_i exp(S_ij - lq_i) + wk_j exp(S_ij - lk_j)."""
    _check(q, k)
    (M, D), N = q.shape, k.shape[0]
    assert diag is None or (diag.shape == q.shape and diag.dtype == q.dtype and diag.is_contiguous() and wq is not None)
    d_pad = max(16, triton.next_power_of_2(D))
    g = torch.empty_like(q)
    ds = torch.empty(M, device=q.device, dtype=torch.float32)
    dummy = scale  # never read: the matching term is compiled out
    _launch(_bwd_kernel, M,
            (q, k, scale, dummy if wq is None else wq, dummy if lq is None else lq,
             dummy if wk is None else wk, dummy if lk is None else lk, q if diag is None else diag, gscale,
             g, ds, M, N, D),
            Q_TERM=wq is not None, K_TERM=wk is not None, HAS_DIAG=diag is not None,
            INPUT_PRECISION=_input_precision(q.dtype), EVEN_K=D % 64 == 0, EVEN_D=D == d_pad, D_PAD=d_pad)
    return g, ds


def _rowdot(x, t, chunk=4096):
    """x_i.t_i in fp32 (n,), a chunk of rows at a time so that the fp32 copies stay small."""
    return torch.cat([(a.float() * b.float()).sum(-1) for a, b in zip(x.split(chunk), t.split(chunk))])


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
        gscale = (grad_loss.float() * scale).reshape(1)  # d loss / d (x_i.t_j) carries one factor s
        need_x_all, need_t_all = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        if x_all is None:
            dx, ds_x = _grad(x, t, scale, gscale, wq=w, lq=lse_xt, wk=w, lk=lse_tx, diag=t)  # rows of A
            dt, _ = _grad(t, x, scale, gscale, wq=w, lq=lse_tx, wk=w, lk=lse_xt, diag=x)  # rows of A.T
            ds = ds_x.sum()  # sum_ij dA_ij A_ij / s: the rows of A hold both softmax terms
        else:
            dx, ds_x = _grad(x, t_all, scale, gscale, wq=w, lq=lse_xt, diag=t)  # rows of A
            dt, ds_t = _grad(t, x_all, scale, gscale, wq=w, lq=lse_tx, diag=x)  # rows of C
            ds = ds_x.sum() + ds_t.sum()
        dt_all = _grad(t_all, x, scale, gscale, wk=w, lk=lse_xt)[0] if need_t_all else None  # columns of A
        dx_all = _grad(x_all, t, scale, gscale, wk=w, lk=lse_tx)[0] if need_x_all else None  # columns of C
        ds = grad_loss.float() * (ds - 2 * (w * xt).sum())
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
    (no gradient flows to it). x_all, t_all: (N, D) gathered features whose rows offset .. offset+n-1 are
    this rank's, or both None for the single-GPU loss (= alip.contrastive_loss). Returns a 0-dim fp32 tensor.
    Differentiable in x, t, x_all, t_all and logit_scale. Runs the Triton kernels on CUDA (and on CPU under
    TRITON_INTERPRET=1), the PyTorch reference elsewhere.
    """
    assert (x_all is None) == (t_all is None), "pass both x_all and t_all, or neither"
    assert x.shape == t.shape and x.dim() == 2, f"x {tuple(x.shape)} and t {tuple(t.shape)} must be the same (n, D)"
    n = x.shape[0]
    if x_all is not None:
        assert x_all.shape == t_all.shape and x_all.shape[1] == x.shape[1], \
            f"x_all {tuple(x_all.shape)} and t_all {tuple(t_all.shape)} must be the same (N, D)"
        assert 0 <= offset <= x_all.shape[0] - n, f"offset {offset}: rows offset..offset+{n}-1 must lie in x_all"
    if weight is not None:
        assert weight.shape == (n,), f"weight {tuple(weight.shape)} must be ({n},)"
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=x.device)
    if not fused_available(x.device):
        return gated_clip_loss_reference(x, t, logit_scale, weight, x_all=x_all, t_all=t_all, offset=offset)
    if x_all is x and t_all is t:  # the gathered features are the local ones: one matrix serves both directions
        x_all = t_all = None
    w = (torch.ones(n, device=x.device) if weight is None else weight.detach().float()) / (2 * n)
    x, t = x.contiguous(), t.contiguous()
    if x_all is not None:
        x_all, t_all = x_all.contiguous(), t_all.contiguous()
    return _GatedClipLoss.apply(x, t, logit_scale, w, x_all, t_all)
