"""kernels.gated_clip_loss against a float64 PyTorch reference: the loss and every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at small, irregular sizes; on a CUDA
host the same tests run compiled, plus the large-size tests at the end. Every test draws fresh random inputs
and prints its seed on failure.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_available, gated_clip_loss, gated_clip_loss_reference

gcl = importlib.import_module("kernels.gated_clip_loss")  # the module (the package exports the function by name)

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
          tol_loss=None, tol_grad=None):
    """Round the float64 inputs to dtype, run the fused loss on DEVICE and the reference in float64 on the
    same rounded values, and compare the loss and the gradients of x, t, (x_all, t_all) and the scale."""
    rect = x_all is not None
    inputs = [x, t] + ([x_all, t_all] if rect else [])
    ours = [a.to(dtype).to(DEVICE).requires_grad_() for a in inputs]
    ref = [a.detach().double().requires_grad_() for a in ours]  # float64 on DEVICE: fast at the GPU sizes too
    s_ours = torch.tensor(scale, device=DEVICE, requires_grad=True)
    s_ref = torch.tensor(scale, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w_ours = None if weight is None else weight.float().to(DEVICE)
    w_ref = None if weight is None else w_ours.double()
    kw = lambda a: dict(x_all=a[2], t_all=a[3], offset=offset) if rect else {}
    loss = gated_clip_loss(ours[0], ours[1], s_ours, w_ours, **kw(ours))
    want = gated_clip_loss_reference(ref[0], ref[1], s_ref, w_ref, **kw(ref))
    loss.backward()
    want.backward()
    # the scale of the terms that cancel (B = 1 square: the loss and all gradients are exactly 0)
    floor = 1e-2 * max(scale, 1.0) / x.shape[0]
    close("loss", loss, want, tol_loss or TOL_LOSS[dtype], seed, floor)
    for name, a, b in zip(["dx", "dt", "dx_all", "dt_all"], ours, ref):
        close(name, a.grad, b.grad, tol_grad or TOL_GRAD[dtype], seed, floor)
    close("dlogit_scale", s_ours.grad, s_ref.grad, tol_grad or TOL_GRAD[dtype], seed, floor)


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


def test_cpu_fallback_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET=1 the function is the PyTorch reference, exactly."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_available("cpu")
    gen, seed = fresh_generator()
    x, t = unit(9, 16, gen).float().requires_grad_(), unit(9, 16, gen).float()
    w = torch.rand(9, generator=gen) + 0.5
    assert torch.equal(gated_clip_loss(x, t, torch.tensor(20.0), w), gated_clip_loss_reference(x, t, torch.tensor(20.0), w))


# --- kernels at small, irregular sizes --------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("B,D,scale,weighted,dtype", [
    (1, 32, 100.0, True, torch.float32),
    (3, 48, 1.0, False, torch.float32),
    (67, 64, 14.3, True, torch.float32),
    (200, 48, 100.0, True, torch.float32),
    (67, 32, 100.0, False, torch.bfloat16),
    (200, 64, 30.0, True, torch.bfloat16),
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
    (67, 200, 133, 64, 100.0, True, torch.float32),
    (50, 67, 0, 32, 20.0, True, torch.float32),
    (67, 200, 66, 48, 100.0, True, torch.bfloat16),
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
def test_matches_alip_contrastive_loss():
    """Same loss and same gradients of the gathered leaves as the loss alip.py uses with --kernel reference."""
    alip = pytest.importorskip("alip", reason="alip.py not importable")
    gen, seed = fresh_generator()
    N, n, offset, D = 64, 16, 32, 48
    x0, t0 = unit(N, D, gen).float().to(DEVICE), unit(N, D, gen).float().to(DEVICE)
    w = (torch.rand(N, generator=gen) + 0.5).to(DEVICE)
    for local in (False, True):
        got = []
        for fn in (alip.contrastive_loss, gated_clip_loss):
            x_all, t_all = x0.clone().requires_grad_(), t0.clone().requires_grad_()
            s = torch.tensor(50.0, device=DEVICE, requires_grad=True)
            if local:  # slices of the gathered leaves, as on one of several ranks
                loss = fn(x_all[offset:offset + n], t_all[offset:offset + n], s, w[:n], x_all=x_all, t_all=t_all,
                          offset=offset)
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
    a = gated_clip_loss(x, t, s, w)
    ga = torch.autograd.grad(a, (x, t))
    b = gated_clip_loss(x, t, s, w, x_all=x, t_all=t, offset=0)
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
    full = gated_clip_loss(x, t, torch.tensor(s, device=DEVICE), w)
    g_full = torch.autograd.grad(full, (x, t))
    n = N // ranks
    local = sum(gated_clip_loss(x[r * n:(r + 1) * n], t[r * n:(r + 1) * n], torch.tensor(s, device=DEVICE),
                                w[r * n:(r + 1) * n], x_all=x, t_all=t, offset=r * n) for r in range(ranks)) / ranks
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
                           x_all=x_all.float().to(DEVICE), t_all=t_all.float().to(DEVICE), offset=10)
    loss.backward()
    xr, tr = x.detach().cpu().double().requires_grad_(), t.detach().cpu().double().requires_grad_()
    gated_clip_loss_reference(xr, tr, 40.0, x_all=x_all.float().double(), t_all=t_all.float().double(), offset=10).backward()
    close("dx", x.grad, xr.grad, 1e-4, seed)
    close("dt", t.grad, tr.grad, 1e-4, seed)


@pytest.mark.skipif(DEVICE != "cpu" or not fused_available("cpu"), reason="interpreter-only: block sizes are autotuned on GPU")
@pytest.mark.parametrize("blocks", [{"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "Q_RESIDENT": False},
                                    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "Q_RESIDENT": False},
                                    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "Q_RESIDENT": True}])
def test_other_block_shapes(monkeypatch, blocks):
    """Rectangular tiles and a BLOCK_K that leaves a partial chunk of D (48 = 32 + 16) or covers all of it."""
    monkeypatch.setattr(gcl, "_INTERPRET_BLOCKS", blocks)
    gen, seed = fresh_generator()
    x_all, t_all = unit(70, 48, gen), unit(70, 48, gen)
    w = torch.rand(37, generator=gen) + 0.5
    check(x_all[20:57], t_all[20:57], 60.0, w, x_all=x_all, t_all=t_all, offset=20, seed=seed)
    check(x_all, t_all, 60.0, None, seed=seed)


GPU_BLOCKS = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs.get("Q_RESIDENT", False))
                     for kernel in (gcl._lse_fwd_kernel, gcl._bwd_kernel) for c in kernel.configs})


@pytest.mark.skipif(DEVICE != "cpu" or not fused_available("cpu"), reason="interpreter-only: the GPU autotunes over these")
@pytest.mark.parametrize("blocks", GPU_BLOCKS, ids=lambda b: "x".join(map(str, b[:3])) + ("-resident" if b[3] else ""))
def test_autotune_block_shapes(monkeypatch, blocks):
    """Every tile shape the GPU autotuner may pick, at a D (80) that pads and a B (150) that is ragged,
    square and rectangular."""
    monkeypatch.setattr(gcl, "_INTERPRET_BLOCKS", dict(zip(["BLOCK_M", "BLOCK_N", "BLOCK_K", "Q_RESIDENT"], blocks)))
    gen, seed = fresh_generator()
    x, t, w = unit(150, 80, gen), unit(150, 80, gen), torch.rand(150, generator=gen) + 0.5
    check(x, t, 100.0, w, seed=seed)
    check(x[40:110], t[40:110], 100.0, w[:70], x_all=x, t_all=t, offset=40, seed=seed)


def test_rejects_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(AssertionError, match="same"):
        gated_clip_loss(x, torch.randn(5, 8), torch.tensor(1.0))
    with pytest.raises(AssertionError, match="both"):
        gated_clip_loss(x, x, torch.tensor(1.0), x_all=x)
    with pytest.raises(AssertionError, match="offset"):
        gated_clip_loss(x, x, torch.tensor(1.0), x_all=x, t_all=x, offset=1)
    with pytest.raises(AssertionError, match="feature dim"):
        gcl._check(torch.randn(2, gcl.MAX_D + 1), torch.randn(2, gcl.MAX_D + 1))
    with pytest.raises(AssertionError, match="dtypes"):
        gcl._check(x, x.double())


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
def test_tf32():
    """fp32 inputs under torch.set_float32_matmul_precision("high"): tf32 GEMMs, ~1e-3 relative error."""
    torch.set_float32_matmul_precision("high")
    gen, seed = fresh_generator()
    x, t = unit(4099, 1000, gen), unit(4099, 1000, gen)
    check(x, t, 100.0, torch.rand(4099, generator=gen) + 0.5, seed=seed, tol_loss=2e-3, tol_grad=2e-2)


@needs_cuda
def test_large_batch_memory():
    """B = 32768, D = 512, bf16: forward + backward allocate O(B D), far below one B x B fp32 matrix (4 GiB)."""
    gen, seed = fresh_generator()
    B, D = 32768, 512
    x = unit(B, D, gen).bfloat16().cuda().requires_grad_()
    t = unit(B, D, gen).bfloat16().cuda().requires_grad_()
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    gated_clip_loss(x, t, s).backward()  # autotune outside the measurement
    x.grad = t.grad = s.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = gated_clip_loss(x, t, s)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(s.grad)
    assert extra < 160 * 2**20, f"peak extra memory {extra / 2**20:.0f} MiB (seed {seed})"
