"""kernels.gated_clip_loss against a float64 PyTorch reference: the loss and every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at small, irregular sizes; on a CUDA
host the same tests run compiled, plus the large-size tests at the end. Every test draws fresh random inputs
and prints its seed on failure.
"""

import contextlib
import functools
import gc
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kernels.gated_clip_loss as gcl
from kernels.gated_clip_loss import choose_impl, fused_available, gated_clip_loss, gated_clip_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not fused_available(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="large-size tests need a CUDA GPU")

# Bound on max|got - want| / max|want| per input dtype (fp32 GEMMs in ieee mode; see test_tf32 for tf32).
# 16-bit gradients are rounded to their dtype once (half an ulp: 2e-3 bf16, 2.4e-4 fp16) after P was rounded.
TOL_LOSS = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
TOL_GRAD = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 GEMMs in full precision unless a test says otherwise (the kernel follows torch's setting)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def deterministic_algorithms(on=True):
    """torch.use_deterministic_algorithms(on) for the block, the setting before it restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


def close(name, got, want, tol, seed, floor=1e-6):
    """max |got - want| <= tol * max(max |want|, floor); prints max and mean difference when it fails."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (seed {seed})"
    diff = (got - want).abs()
    bound = tol * max(want.abs().max().item(), floor)
    assert diff.max().item() <= bound, (f"{name}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, "
                                        f"max |ref| {want.abs().max().item():.3e}, allowed {bound:.3e} (seed {seed})")


def check(x, t, scale, weight=None, x_all=None, t_all=None, offset=0, dtype=torch.float32, seed=0,
          tol_loss=None, tol_grad=None, grad_loss=1.0, deterministic=False):
    """Round the float64 inputs to dtype, run the fused loss on DEVICE (its deterministic path if asked) and the
    reference in float64 on the same rounded values, and compare the loss and the gradients (of
    grad_loss * loss) of x, t, (x_all, t_all) and the scale. Returns the fused loss and gradients."""
    rect = x_all is not None
    inputs = [x, t] + ([x_all, t_all] if rect else [])
    ours = [a.to(dtype).to(DEVICE).requires_grad_() for a in inputs]
    ref = [a.detach().double().requires_grad_() for a in ours]  # float64 on DEVICE: fast at the GPU sizes too
    s_ours = torch.tensor(scale, device=DEVICE, requires_grad=True)
    s_ref = torch.tensor(scale, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w_ours = None if weight is None else weight.float().to(DEVICE)
    w_ref = None if weight is None else w_ours.double()
    kw = lambda a: dict(x_all=a[2], t_all=a[3], offset=offset) if rect else {}
    with deterministic_algorithms(deterministic):
        loss = gated_clip_loss(ours[0], ours[1], s_ours, w_ours, **kw(ours), impl="fused")
        loss.backward(torch.tensor(grad_loss, device=DEVICE))
    want = gated_clip_loss_reference(ref[0], ref[1], s_ref, w_ref, **kw(ref))
    want.backward(torch.tensor(grad_loss, dtype=torch.float64, device=DEVICE))
    # the scale of the terms that cancel (B = 1 square: the loss and all gradients are exactly 0). p is rounded to
    # the input dtype before the P @ k GEMM and the positive term added in fp32 after it, so where they cancel the
    # error stays at about s w/(2n) 2^-8 |k| = 2^-9 s w/n in bf16: the floor is that times 5 for the row's other
    # roundings. The loss and its gradients are linear in the weights, the gradients in grad_loss.
    floor = 1e-2 * max(scale, 1.0) / x.shape[0] * (1.0 if weight is None else weight.abs().max().item())
    close("loss", loss, want, tol_loss or TOL_LOSS[dtype], seed, floor)
    for name, a, b in zip(["dx", "dt", "dx_all", "dt_all"], ours, ref):
        close(name, a.grad, b.grad, tol_grad or TOL_GRAD[dtype], seed, floor * grad_loss)
    close("dlogit_scale", s_ours.grad, s_ref.grad, tol_grad or TOL_GRAD[dtype], seed, floor * grad_loss)
    return [loss] + [a.grad for a in ours] + [s_ours.grad]


# --- the reference itself -------------------------------------------------------------------------------------

def test_reference_is_the_cross_entropy_loss():
    """The float64 reference equals mean_i w_i (CE(x->t) + CE(t->x)) / 2 with labels offset + i."""
    gen, seed = fresh_generator()
    N, n, offset, D = 40, 11, 17, 24
    x_all, t_all, w = unit(N, D, gen), unit(N, D, gen), torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    x, t = x_all[offset:offset + n], t_all[offset:offset + n]
    labels = torch.arange(n) + offset
    for s in (1.0, 37.0, 100.0):
        ce = (F.cross_entropy(s * x @ t_all.T, labels, reduction="none")
              + F.cross_entropy(s * t @ x_all.T, labels, reduction="none")) / 2
        close("rectangular", gated_clip_loss_reference(x, t, s, w, x_all=x_all, t_all=t_all, offset=offset),
              (w * ce).mean(), 1e-12, seed)
        ce = (F.cross_entropy(s * x @ t.T, torch.arange(n), reduction="none")
              + F.cross_entropy(s * t @ x.T, torch.arange(n), reduction="none")) / 2
        close("square", gated_clip_loss_reference(x, t, s), ce.mean(), 1e-12, seed)


def test_reference_widens_16bit_inputs():
    """16-bit inputs give fp32 logits of exact products: the reference agrees with float64 on the same rounded
    values to fp32 rounding, where logits rounded to bf16 would be off by ~s 2^-9."""
    gen, seed = fresh_generator()
    x, t = unit(40, 24, gen).bfloat16(), unit(40, 24, gen).bfloat16()
    w = torch.rand(40, generator=gen) + 0.5
    got = gated_clip_loss_reference(x, t, torch.tensor(100.0), w)
    assert got.dtype == torch.float32
    close("loss", got, gated_clip_loss_reference(x.double(), t.double(), 100.0, w.double()), 1e-6, seed)


def test_cpu_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET=1, auto is the PyTorch reference, exactly, and fused says why it cannot run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_available("cpu")
    gen, seed = fresh_generator()
    x, t = unit(9, 16, gen).float().requires_grad_(), unit(9, 16, gen).float()
    w = torch.rand(9, generator=gen) + 0.5
    assert torch.equal(gated_clip_loss(x, t, torch.tensor(20.0), w), gated_clip_loss_reference(x, t, torch.tensor(20.0), w))
    with pytest.raises(RuntimeError, match="CUDA device or TRITON_INTERPRET=1") as e:
        gated_clip_loss(x, t, torch.tensor(20.0), w, impl="fused")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n,N,D,dtype,device,impl,want", [
    (4096, 4096, 512, torch.bfloat16, "cpu", "auto", "reference"),  # the interpreter is for tests
    (4096, 4096, 512, torch.bfloat16, "cuda", "auto", "fused"),
    (512, 4096, 512, torch.bfloat16, "cuda", "auto", "fused"),  # n N = AUTO_MIN_LOGITS
    (511, 4096, 512, torch.bfloat16, "cuda", "auto", "reference"),
    (1024, 1024, 512, torch.float32, "cuda", "auto", "reference"),
    (4096, 4096, 512, torch.float64, "cuda", "auto", "reference"),  # dtypes the kernels lack
    (4096, 4096, 2048, torch.bfloat16, "cuda", "auto", "reference"),  # D beyond MAX_D
    (8, 8, 16, torch.bfloat16, "cuda", "fused", "fused"),
    (4096, 4096, 512, torch.bfloat16, "cuda", "reference", "reference"),
])
def test_choose_impl(n, N, D, dtype, device, impl, want):
    name, reason = choose_impl(n, N, D, dtype, device, impl)
    assert name == want and reason
    assert gcl.AUTO_MIN_LOGITS == 512 * 4096


def test_choose_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="impl 'triton'"):
        choose_impl(8, 8, 16, torch.float32, "cpu", "triton")


@needs_kernels
def test_impl_switch(monkeypatch):
    """impl="reference" is the reference, exactly; impl="fused" runs the kernels (here in the interpreter, on a
    CUDA host compiled) where auto would not, and agrees with it."""
    gen, seed = fresh_generator()
    x, t = unit(20, 32, gen).float().to(DEVICE), unit(20, 32, gen).float().to(DEVICE)
    w, s = (torch.rand(20, generator=gen) + 0.5).to(DEVICE), torch.tensor(30.0, device=DEVICE)
    assert choose_impl(20, 20, 32, x.dtype, DEVICE)[0] == "reference"
    assert torch.equal(gated_clip_loss(x, t, s, w, impl="reference"), gated_clip_loss_reference(x, t, s, w))
    assert torch.equal(gated_clip_loss(x, t, s, w), gated_clip_loss_reference(x, t, s, w))
    runs = []
    monkeypatch.setattr(gcl._GatedClipLoss, "apply", lambda *a, f=gcl._GatedClipLoss.apply: runs.append(1) or f(*a))
    close("loss", gated_clip_loss(x, t, s, w, impl="fused"), gated_clip_loss_reference(x, t, s, w), 1e-5, seed)
    assert runs == [1]


# --- kernels at small, irregular sizes --------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("B,D,scale,weighted,dtype", [
    (1, 32, 100.0, True, torch.float32),
    (3, 48, 1.0, False, torch.float32),
    (67, 64, 14.3, True, torch.float32),
    (150, 48, 100.0, True, torch.float32),
    (67, 32, 100.0, False, torch.bfloat16),
    (130, 64, 30.0, True, torch.bfloat16),
    (67, 48, 50.0, True, torch.float16),
])
def test_square(B, D, scale, weighted, dtype):
    gen, seed = fresh_generator()
    x, t = unit(B, D, gen), unit(B, D, gen)
    w = torch.rand(B, generator=gen) * 2 if weighted else None
    check(x, t, scale, w, dtype=dtype, seed=seed)


@needs_kernels
@pytest.mark.parametrize("n,N,offset,D,scale,weighted,dtype", [
    (1, 3, 2, 32, 100.0, True, torch.float32),
    (3, 67, 41, 48, 1.0, False, torch.float32),
    (67, 150, 83, 64, 100.0, True, torch.float32),
    (50, 67, 0, 32, 20.0, True, torch.float32),
    (45, 130, 66, 48, 100.0, True, torch.bfloat16),
    (3, 67, 64, 64, 7.0, False, torch.float16),
])
def test_rectangular(n, N, offset, D, scale, weighted, dtype):
    gen, seed = fresh_generator()
    x_all, t_all = unit(N, D, gen), unit(N, D, gen)
    w = torch.rand(n, generator=gen) * 2 if weighted else None
    x, t = x_all[offset:offset + n], t_all[offset:offset + n]
    check(x, t, scale, w, x_all=x_all, t_all=t_all, offset=offset, dtype=dtype, seed=seed)


@needs_kernels
@pytest.mark.parametrize("rect", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_similarity_near_minus_one(rect, dtype):
    """Images near u, texts near -u: at scale 100 every logit is about -100, where exp(logit - a fixed shift)
    underflows; the running max keeps the loss and gradients finite and right."""
    gen, seed = fresh_generator()
    N, D = 67, 48
    u = F.normalize(torch.randn(D, generator=gen, dtype=torch.float64), dim=0)
    x_all = F.normalize(u + 0.005 * torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)
    t_all = F.normalize(-u + 0.005 * torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)
    assert (x_all @ t_all.T).max() < -0.99
    w = torch.rand(N, generator=gen) + 0.5
    if rect:
        n, offset = 20, 30
        check(x_all[offset:offset + n], t_all[offset:offset + n], 100.0, w[:n], x_all=x_all, t_all=t_all,
              offset=offset, dtype=dtype, seed=seed)
    else:
        check(x_all, t_all, 100.0, w, dtype=dtype, seed=seed)


@needs_kernels
@pytest.mark.parametrize("rect", [False, True])
def test_fp16_tiny_p(rect):
    """p = w'_i P_ij, w' = w / (2n), is about w / (2 n N): at B = 8192 and w = 1 most of it is below half of fp16's
    smallest subnormal (6e-8) and rounds to 0 unless the kernel scales it. Weights of ~3e-4 at B = 67 put p at
    ~3e-8, where rounding to fp16 would make every p 0 or 6e-8. The loss is scaled by 2^16 before backward, as
    torch.amp.GradScaler starts, which leaves p as it is and the gradients in fp16's normal range."""
    gen, seed = fresh_generator()
    N, D = 67, 48
    x_all, t_all = unit(N, D, gen), unit(N, D, gen)
    w = (torch.rand(N, generator=gen) + 0.5) * 3e-4
    if rect:
        n, offset = 30, 20
        check(x_all[offset:offset + n], t_all[offset:offset + n], 10.0, w[:n], x_all=x_all, t_all=t_all,
              offset=offset, dtype=torch.float16, seed=seed, grad_loss=2.0**16)
    else:
        check(x_all, t_all, 10.0, w, dtype=torch.float16, seed=seed, grad_loss=2.0**16)


@needs_kernels
def test_matches_alip_contrastive_loss():
    """Same loss and same gradients of the gathered leaves as the loss alip.py uses with --kernel reference."""
    alip = pytest.importorskip("alip", reason="alip.py not importable")
    gen, seed = fresh_generator()
    N, n, offset, D = 64, 16, 32, 48
    x0, t0 = unit(N, D, gen).float().to(DEVICE), unit(N, D, gen).float().to(DEVICE)
    w = (torch.rand(N, generator=gen) + 0.5).to(DEVICE)
    for local in (False, True):
        got = []
        for fn in (alip.contrastive_loss, functools.partial(gated_clip_loss, impl="fused")):
            x_all, t_all = x0.clone().requires_grad_(), t0.clone().requires_grad_()
            s = torch.tensor(50.0, device=DEVICE, requires_grad=True)
            if local:  # slices of the gathered leaves, as on one of several ranks
                where = {"offset": offset} if fn is gated_clip_loss else {}  # alip's takes the positives from x, t
                loss = fn(x_all[offset:offset + n], t_all[offset:offset + n], s, w[:n], x_all=x_all, t_all=t_all,
                          **where)
            else:
                loss = fn(x_all, t_all, s, w)
            got.append((loss, *torch.autograd.grad(loss, (x_all, t_all, s))))
        for name, a, b in zip(["loss", "dx_all", "dt_all", "dlogit_scale"], got[1], got[0]):
            close(name, a, b, 1e-4, seed)


@needs_kernels
def test_gathered_features_that_are_the_local_ones():
    """x_all is x, t_all is t (one rank) takes the square path: same loss and gradients as without them."""
    gen, seed = fresh_generator()
    x = unit(45, 32, gen).float().to(DEVICE).requires_grad_()
    t = unit(45, 32, gen).float().to(DEVICE).requires_grad_()
    s, w = torch.tensor(30.0, device=DEVICE), (torch.rand(45, generator=gen) + 0.5).to(DEVICE)
    a = gated_clip_loss(x, t, s, w, impl="fused")
    ga = torch.autograd.grad(a, (x, t))
    b = gated_clip_loss(x, t, s, w, x_all=x, t_all=t, offset=0, impl="fused")
    gb = torch.autograd.grad(b, (x, t))
    close("loss", b, a, 1e-6, seed)
    close("dx", gb[0], ga[0], 1e-5, seed)
    close("dt", gb[1], ga[1], 1e-5, seed)


@needs_kernels
def test_local_losses_sum_to_the_global_gradients():
    """Ranks' local losses, with x_all = x sliced per rank as after an all_gather, give the global gradients."""
    gen, seed = fresh_generator()
    N, D, ranks, s = 48, 32, 3, 25.0
    x = unit(N, D, gen).float().to(DEVICE).requires_grad_()
    t = unit(N, D, gen).float().to(DEVICE).requires_grad_()
    w = (torch.rand(N, generator=gen) + 0.5).to(DEVICE)
    full = gated_clip_loss(x, t, torch.tensor(s, device=DEVICE), w, impl="fused")
    g_full = torch.autograd.grad(full, (x, t))
    n = N // ranks
    local = sum(gated_clip_loss(x[r * n:(r + 1) * n], t[r * n:(r + 1) * n], torch.tensor(s, device=DEVICE),
                                w[r * n:(r + 1) * n], x_all=x, t_all=t, offset=r * n, impl="fused")
                for r in range(ranks)) / ranks
    g_local = torch.autograd.grad(local, (x, t))
    close("loss", local, full, 1e-5, seed)
    close("dx", g_local[0], g_full[0], 1e-4, seed)
    close("dt", g_local[1], g_full[1], 1e-4, seed)


@needs_kernels
def test_gathered_features_without_grad():
    """x_all, t_all that need no gradient skip their two backward launches; x, t, s still get theirs."""
    gen, seed = fresh_generator()
    x_all, t_all = unit(67, 32, gen), unit(67, 32, gen)
    x = x_all[10:30].float().to(DEVICE).requires_grad_()
    t = t_all[10:30].float().to(DEVICE).requires_grad_()
    loss = gated_clip_loss(x, t, torch.tensor(40.0, device=DEVICE), None,
                           x_all=x_all.float().to(DEVICE), t_all=t_all.float().to(DEVICE), offset=10, impl="fused")
    loss.backward()
    xr, tr = x.detach().cpu().double().requires_grad_(), t.detach().cpu().double().requires_grad_()
    gated_clip_loss_reference(xr, tr, 40.0, x_all=x_all.float().double(), t_all=t_all.float().double(), offset=10).backward()
    close("dx", x.grad, xr.grad, 1e-4, seed)
    close("dt", t.grad, tr.grad, 1e-4, seed)


interpreter_only = pytest.mark.skipif(DEVICE != "cpu" or not fused_available("cpu"),
                                      reason="interpreter-only: the GPU autotunes the blocks")


@interpreter_only
@pytest.mark.parametrize("blocks", [{"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16},
                                    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 64}])
def test_other_block_shapes(monkeypatch, blocks):
    """Rectangular tiles, a BLOCK_K that divides D (48 = 3 x 16) or covers all of it (the default blocks leave
    a partial chunk, 48 = 32 + 16), and the gradient in three even slices of D or in one."""
    monkeypatch.setattr(gcl, "_INTERPRET_BLOCKS", blocks)
    gen, seed = fresh_generator()
    x_all, t_all = unit(50, 48, gen), unit(50, 48, gen)
    w = torch.rand(27, generator=gen) + 0.5
    check(x_all[10:37], t_all[10:37], 60.0, w, x_all=x_all, t_all=t_all, offset=10, seed=seed)
    check(x_all, t_all, 60.0, None, seed=seed)


GPU_BLOCKS = sorted({(m, n, k) for table in (gcl._FWD_CONFIGS, gcl._BWD_CONFIGS) for cs in table.values()
                     for m, n, k, *_ in cs})


@interpreter_only
@pytest.mark.parametrize("blocks", GPU_BLOCKS, ids=lambda b: "x".join(map(str, b)))
def test_autotune_block_shapes(monkeypatch, blocks):
    """Every tile shape the GPU autotuner may pick, at a D (80) that pads and leaves a partial second slice of
    the gradient (BLOCK_D = 64), a B that is ragged (at least two row and two column blocks, the last ones
    partial), square and rectangular."""
    monkeypatch.setattr(gcl, "_INTERPRET_BLOCKS", dict(zip(["BLOCK_M", "BLOCK_N", "BLOCK_K"], blocks), BLOCK_D=64))
    gen, seed = fresh_generator()
    B = max(blocks[:2]) + 5
    x, t, w = unit(B, 80, gen), unit(B, 80, gen), torch.rand(B, generator=gen) + 0.5
    check(x, t, 100.0, w, seed=seed)
    n = B // 2
    check(x[5:5 + n], t[5:5 + n], 100.0, w[:n], x_all=x, t_all=t, offset=5, seed=seed)


# --- split sweeps, the deterministic path, any D ----------------------------------------------------------------

@interpreter_only
@pytest.mark.parametrize("sms,rect,deterministic", [(1, False, False), (64, False, True), (1, True, True),
                                                    (64, True, False)])
def test_split_sweeps_merge_exactly(monkeypatch, sms, rect, deterministic):
    """Grids sized for a device of 1 SM: no split, and two forward programs that each take several row blocks
    (merging their column LSEs in place); of 64 SMs: every sweep split into runs of one block, whose partial
    LSEs merge and whose partial gradient sums add up, atomically or in order."""
    monkeypatch.setattr(gcl, "_INTERPRET_SMS", sms)
    gen, seed = fresh_generator()
    N, D = 150, 48
    x_all, t_all, w = unit(N, D, gen), unit(N, D, gen), torch.rand(N, generator=gen) + 0.5
    if rect:
        check(x_all[70:115], t_all[70:115], 100.0, w[:45], x_all=x_all, t_all=t_all, offset=70, seed=seed,
              deterministic=deterministic)
    else:
        check(x_all, t_all, 100.0, w, seed=seed, deterministic=deterministic)


@needs_kernels
@pytest.mark.parametrize("rect", [False, True])
def test_deterministic_path_gives_the_same_bits(rect):
    """Under torch.use_deterministic_algorithms(True) no sum depends on the order of atomic adds: the same inputs
    give the same loss and gradients, bit for bit, and they match the reference."""
    gen, seed = fresh_generator()
    N, D = 67, 48
    x_all, t_all, w = unit(N, D, gen), unit(N, D, gen), torch.rand(N, generator=gen) + 0.5
    args = (x_all[20:50], t_all[20:50], 50.0, w[:30], x_all, t_all, 20) if rect else (x_all, t_all, 50.0, w)
    first = check(*args, dtype=torch.bfloat16, seed=seed, deterministic=True)
    second = check(*args, dtype=torch.bfloat16, seed=seed, deterministic=True)
    for name, a, b in zip(["loss", "dx", "dt", "dx_all", "dt_all", "dlogit_scale"], first, second):
        assert torch.equal(a, b), f"{name}: two runs differ by up to {(a - b).abs().max().item():.3e} (seed {seed})"


@needs_kernels
@pytest.mark.parametrize("B,D,dtype", [(37, 20, torch.float32), (45, 50, torch.bfloat16), (30, 200, torch.float16)])
def test_any_feature_dim(B, D, dtype):
    """D that is not a multiple of 16 is padded with zero columns (which add nothing to any product); the
    gradients come back D wide."""
    gen, seed = fresh_generator()
    x_all, t_all, w = unit(B + 9, D, gen), unit(B + 9, D, gen), torch.rand(B + 9, generator=gen) + 0.5
    check(x_all[:B], t_all[:B], 60.0, w[:B], dtype=dtype, seed=seed)
    check(x_all[4:4 + B], t_all[4:4 + B], 60.0, w[:B], x_all=x_all, t_all=t_all, offset=4, dtype=dtype, seed=seed)


# --- the launch plan ---------------------------------------------------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Every interpreted kernel launch, as {"kernel", "programs", "flops"}: the grid's size and the FLOPs of its
    tl.dot calls (2 m k n for an (m, k) by (k, n) product)."""
    from triton.runtime import interpreter
    record = []
    call, builder = interpreter.GridExecutor.__call__, interpreter.interpreter_builder
    set_grid_dim, create_dot = builder.set_grid_dim, builder.create_dot

    def launch(executor, *args, **kwargs):
        record.append({"kernel": executor.fn.__name__, "programs": 0, "flops": 0})
        return call(executor, *args, **kwargs)

    def grid(x, y, z):
        record[-1]["programs"] = x * y * z
        return set_grid_dim(x, y, z)

    def dot(a, b, d, *args):
        (m, k), n = a.data.shape, b.data.shape[1]
        record[-1]["flops"] += 2 * m * k * n
        return create_dot(a, b, d, *args)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
    monkeypatch.setattr(builder, "set_grid_dim", grid)
    monkeypatch.setattr(builder, "create_dot", dot)
    return record


@interpreter_only
@pytest.mark.parametrize("gathered,all_grads", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("block_d", [64, 32])
def test_launch_plan_is_what_the_launchers_run(monkeypatch, launches, gathered, all_grads, deterministic, block_d):
    """launch_plan lists the launches forward + backward make, each with its grid's programs and its similarity
    GEMMs, counted as the FLOPs of its tl.dot calls over 2 n N D: at sizes that the tiles cover exactly, with the
    gradient in one slice of D or in two (each recomputing S)."""
    monkeypatch.setitem(gcl._INTERPRET_BLOCKS, "BLOCK_D", block_d)
    gen, seed = fresh_generator()
    n, N, D, offset = (64, 160, 64, 32) if gathered else (96, 96, 64, 0)
    x_all, t_all = unit(N, D, gen).float(), unit(N, D, gen).float()
    x, t = x_all[offset:offset + n].clone().requires_grad_(), t_all[offset:offset + n].clone().requires_grad_()
    kw = dict(x_all=x_all.requires_grad_(all_grads), t_all=t_all.requires_grad_(all_grads), offset=offset)
    with deterministic_algorithms(deterministic):
        gated_clip_loss(x, t, torch.tensor(30.0), **(kw if gathered else {}), impl="fused").backward()
    got = [(r["kernel"], r["programs"], r["flops"] / (2 * n * N * D)) for r in launches]
    plan = gcl.launch_plan(n, N, D, torch.float32, gcl._INTERPRET_SMS, deterministic, gathered, all_grads)
    assert got == [(r["kernel"], r["programs"], r["gemms"]) for r in plan], (got, plan)


@pytest.mark.parametrize("n,N", [(512, 4096), (1024, 8192), (4096, 32768), (4096, 4096), (8192, 8192),
                                 (65536, 65536)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_launch_plan_fills_an_h100(monkeypatch, n, N, deterministic):
    """At D = 512 in bf16 on 132 SMs, from n = 512 local rows of 8 GPUs and from B = 4096 on one: every launch
    has a program per SM, and the loss costs the floor's similarity GEMMs, 4 square and 8 gathered (one more per
    direction on the deterministic path). The GPU's config tables, whatever process asks."""
    monkeypatch.setattr(gcl, "_interpreted", lambda: False)
    plan = gcl.launch_plan(n, N, 512, torch.bfloat16, 132, deterministic=deterministic)
    assert min(r["programs"] for r in plan) >= 132, plan
    assert sum(r["gemms"] for r in plan) == {False: 4, True: 8}[N != n] + deterministic * (1 + (N != n)), plan
    assert choose_impl(n, N, 512, torch.bfloat16, "cuda")[0] == "fused"


def test_rejects_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(AssertionError, match="same"):
        gated_clip_loss(x, torch.randn(5, 8), torch.tensor(1.0))
    with pytest.raises(AssertionError, match="both"):
        gated_clip_loss(x, x, torch.tensor(1.0), x_all=x)
    with pytest.raises(AssertionError, match="offset"):
        gated_clip_loss(x, x, torch.tensor(1.0), x_all=x, t_all=x, offset=1)
    with pytest.raises(AssertionError, match="weight"):
        gated_clip_loss(x, x, torch.tensor(1.0), torch.ones(3))
    if fused_available(x.device):
        with pytest.raises(AssertionError, match="feature dim"):
            gated_clip_loss(torch.randn(2, gcl.MAX_D + 1), torch.randn(2, gcl.MAX_D + 1), torch.tensor(1.0),
                            impl="fused")
        with pytest.raises(AssertionError, match="dtypes"):
            gated_clip_loss(x, x.double(), torch.tensor(1.0), impl="fused")


# --- memory ---------------------------------------------------------------------------------------------

def extra_bytes_bound(n, N, D, itemsize, square, sms, block_m, block_n):
    """The module docstring's bound on the bytes forward + backward allocate beyond the inputs and gradients, for
    a device of sms SMs whose largest forward row block is block_m and largest backward owned block block_n."""
    dp = -(-D // 16) * 16
    forward = 4 * (n + sms * block_m) + 8 * sms * N * square + 12 * min(n, gcl._ROWDOT_ROWS) * D
    backward = 4 * (n + N + sms * block_n) * dp
    padded = itemsize * (n + N) * dp * (D % 16 != 0)
    return max(forward, backward) + padded + 64 * n + 16 * N


class LiveBytes(TorchDispatchMode):
    """Every storage that an op allocates while the mode is on, its size, and when it is freed."""

    def __init__(self):
        super().__init__()
        self.events = []  # (allocation number, +bytes) when allocated, (the same number, -bytes) when freed
        self.live = {}  # storage address -> allocation number

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if torch.is_tensor(a)}
        for o in tree_flatten(out)[0]:
            if not torch.is_tensor(o):
                continue
            storage = o.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in given or ptr in self.live:
                continue  # a view, or an in-place or out= result
            self.live[ptr] = number = len(self.events)
            self.events.append((number, size))
            weakref.finalize(storage, self._freed, ptr, number, size)  # storages' Python objects live as long
        return out

    def _freed(self, ptr, number, size):
        self.live.pop(ptr, None)
        self.events.append((number, -size))

    def peak(self, leave_out=()):
        """The most bytes live at once, leaving out the storages of leave_out (tensors still alive)."""
        skip = {self.live[a.untyped_storage().data_ptr()] for a in leave_out}
        live = top = 0
        for number, size in self.events:
            if number not in skip:
                live += size
                top = max(top, live)
        return top


@pytest.fixture
def launches_free_their_arguments(monkeypatch):
    """The Triton interpreter leaves each launch's arguments in a reference cycle until the next garbage
    collection; collect after every launch, so that a tensor is freed when the launcher drops it, as on a GPU."""
    from triton.runtime.interpreter import GridExecutor
    launch = GridExecutor.__call__

    def launch_and_collect(*args, **kwargs):
        try:
            return launch(*args, **kwargs)
        finally:
            gc.collect()
    monkeypatch.setattr(GridExecutor, "__call__", launch_and_collect)


@interpreter_only
@pytest.mark.parametrize("rect,deterministic,sms", [(False, False, 1), (False, True, 6), (True, False, 6),
                                                    (True, True, 1)])
def test_extra_memory(monkeypatch, launches_free_their_arguments, rect, deterministic, sms):
    """Forward + backward allocate at most the docstring's bound beyond inputs and gradients, with D padded (40 to
    48), split sweeps (6 SMs) and not (1 SM); there the column LSE's workspace is 2 x SMs x N (two programs that
    each take several row blocks, not one row of it per row block), measured on its own too. Bytes are counted
    per storage that an op returns, so the bound holds for whatever the launchers allocate. x_i.t_i is taken 8
    rows at a time, so that its fp32 copies do not hide the other terms."""
    monkeypatch.setattr(gcl, "_ROWDOT_ROWS", 8)
    monkeypatch.setattr(gcl, "_INTERPRET_SMS", sms)
    gen, seed = fresh_generator()
    N, D = 70, 40
    n, offset = (30, 30) if rect else (N, 0)
    x_all, t_all = unit(N, D, gen).bfloat16(), unit(N, D, gen).bfloat16()
    x, t = x_all[offset:offset + n].clone().requires_grad_(), t_all[offset:offset + n].clone().requires_grad_()
    x_all.requires_grad_()
    t_all.requires_grad_()
    s = torch.tensor(30.0, requires_grad=True)
    w = torch.rand(n, generator=gen) + 0.5
    with LiveBytes() as mem, deterministic_algorithms(deterministic):
        loss = gated_clip_loss(x, t, s, w, **(dict(x_all=x_all, t_all=t_all, offset=offset) if rect else {}),
                               impl="fused")
        loss.backward()
    grads = [x.grad, t.grad, s.grad] + ([x_all.grad, t_all.grad] if rect else [])
    blocks = gcl._INTERPRET_BLOCKS
    peak = mem.peak(grads)
    bound = extra_bytes_bound(n, N, D, 2, not rect, sms, blocks["BLOCK_M"], blocks["BLOCK_N"])
    assert peak <= bound, f"forward + backward allocated {peak} bytes beyond inputs and gradients, bound {bound} (seed {seed})"
    if sms == 1 and not rect:
        groups, splits = gcl._fwd_grid(N, N, blocks["BLOCK_M"], blocks["BLOCK_N"], sms)
        assert (groups, splits) == (2, 1) and triton.cdiv(N, blocks["BLOCK_M"]) == 3
        q, k = gcl._pad(x.detach()), gcl._pad(t.detach())
        with LiveBytes() as mem:
            row, col = gcl._lse(q, k, s.detach().reshape(1), True, False)
        peak, bound = mem.peak([row, col]), 4 * groups * N + 4 * N
        assert peak == bound, f"the column LSE allocated {peak} bytes besides its results, expected {bound} (seed {seed})"


# --- GPU, large sizes ---------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rect", [False, True])
def test_large(dtype, rect):
    gen, seed = fresh_generator()
    N, D = 8192, 512
    x_all, t_all = unit(N, D, gen), unit(N, D, gen)
    w = torch.rand(N, generator=gen) * 2
    if rect:
        n, offset = 1000, 5000
        check(x_all[offset:offset + n], t_all[offset:offset + n], 100.0, w[:n], x_all=x_all, t_all=t_all,
              offset=offset, dtype=dtype, seed=seed)
    else:
        check(x_all, t_all, 100.0, w, dtype=dtype, seed=seed)


@needs_cuda
@pytest.mark.parametrize("sms,deterministic", [(1, False), (1024, False), (1024, True)])
def test_merge_paths_at_gpu_sizes(monkeypatch, sms, deterministic):
    """B = 8192, D = 512, bf16, square and one rank's 1024 rows, on grids sized for a device of 1 SM (no split:
    two forward programs that each take 32 or more row blocks and merge their column LSEs in place; every owned
    block sweeps all rows) and of 1024 SMs (every sweep split: partial LSEs merged, partial gradient sums added
    atomically or, deterministically, in order and to the same bits twice), against float64."""
    monkeypatch.setattr(gcl, "_sm_count", lambda device: sms)
    gen, seed = fresh_generator()
    N, D, n, offset = 8192, 512, 1024, 3072
    x_all, t_all = unit(N, D, gen), unit(N, D, gen)
    w = torch.rand(N, generator=gen) * 2
    for args in [(x_all, t_all, 100.0, w),
                 (x_all[offset:offset + n], t_all[offset:offset + n], 100.0, w[:n], x_all, t_all, offset)]:
        first = check(*args, dtype=torch.bfloat16, seed=seed, deterministic=deterministic)
        if deterministic:
            second = check(*args, dtype=torch.bfloat16, seed=seed, deterministic=True)
            assert all(torch.equal(a, b) for a, b in zip(first, second)), f"two runs differ (seed {seed})"


@needs_cuda
def test_tf32():
    """fp32 inputs under torch.set_float32_matmul_precision("high"): tf32 GEMMs, ~1e-3 relative error."""
    torch.set_float32_matmul_precision("high")
    gen, seed = fresh_generator()
    x, t = unit(4099, 1000, gen), unit(4099, 1000, gen)
    check(x, t, 100.0, torch.rand(4099, generator=gen) + 0.5, seed=seed, tol_loss=2e-3, tol_grad=2e-2)


@needs_cuda
def test_large_batch_memory():
    """B = 32768, D = 512, bf16: forward + backward allocate no more than the docstring's bound beyond the inputs
    and gradients (about 150 MiB on an H100, mostly the fp32 sums of dx and dt, where one B x B fp32 matrix is
    4 GiB)."""
    gen, seed = fresh_generator()
    B, D = 32768, 512
    x = unit(B, D, gen).bfloat16().cuda().requires_grad_()
    t = unit(B, D, gen).bfloat16().cuda().requires_grad_()
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    gated_clip_loss(x, t, s, impl="fused").backward()  # autotune outside the measurement
    x.grad = t.grad = s.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = gated_clip_loss(x, t, s, impl="fused")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in (x.grad, t.grad, s.grad))
    # the caching allocator rounds each of the few dozen allocations up to a multiple of 512 bytes
    block_m = max(c[0] for cs in gcl._FWD_CONFIGS.values() for c in cs)
    block_n = max(c[1] for cs in gcl._BWD_CONFIGS.values() for c in cs)
    bound = extra_bytes_bound(B, B, D, 2, True, gcl._sm_count(x.device), block_m, block_n) + 64 * 512
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(s.grad)
    assert extra <= bound, f"peak extra memory {extra} bytes, bound {bound} (seed {seed})"
