"""kernels.gated_clip_loss against a float64 PyTorch reference: the loss and every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at small, irregular sizes; on a CUDA
host the same tests run compiled, plus the large-size tests at the end. Every test draws fresh random inputs
and prints its seed on failure.
"""

import contextlib
import functools
import gc
import itertools
import os
import random
import weakref

import pytest
import torch
import torch.nn.functional as F
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
    """Round the float64 inputs to dtype, run the fused loss on DEVICE (under torch.use_deterministic_algorithms
    if asked) and the
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
    (32768, 32768, 512, torch.bfloat16, "cuda", "auto", "fused"),  # the reference's logits: 4 GiB a matrix
    (512, 4096, 512, torch.bfloat16, "cuda", "auto", "fused"),  # a DDP rank: the reference's ~60 launches
    (4096, 4096, 512, torch.float64, "cuda", "auto", "reference"),  # dtypes the kernels lack
    (4096, 4096, 2048, torch.bfloat16, "cuda", "auto", "reference"),  # D beyond MAX_D
    (8, 8, 16, torch.bfloat16, "cuda", "fused", "fused"),
    (4096, 4096, 512, torch.bfloat16, "cuda", "reference", "reference"),
])
def test_choose_impl(n, N, D, dtype, device, impl, want):
    name, reason = choose_impl(n, N, D, dtype, device, impl)
    assert name == want and reason


@pytest.fixture
def fresh_model(monkeypatch):
    """MODEL as a test sets it, with the cached plans and reference costs cleared before and after."""
    gcl._schedule.cache_clear()
    gcl._reference_ms.cache_clear()
    monkeypatch.setattr(gcl, "MODEL", dict(gcl.MODEL, tflops=dict(gcl.MODEL["tflops"])))
    yield gcl.MODEL
    gcl._schedule.cache_clear()
    gcl._reference_ms.cache_clear()


class CountLaunches(TorchDispatchMode):
    """How many PyTorch ops that launch a kernel run under it."""

    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.launches += func.overloadpacket.__name__ not in NO_LAUNCH | {"promote_types"}
        return func(*args, **(kwargs or {}))


def test_auto_follows_the_model(fresh_model):
    """auto runs whichever the model prices lower on an H100. fp32 inputs with tf32 GEMMs at D = 1024: no tf32
    config of the backward fits its registers, so the kernels' backward runs ieee fp32 at the FMA units' 67
    TFLOP/s, while the reference's GEMMs run tf32 at 495: the reference. In bf16 the kernels' GEMMs run at the
    tensor cores' rate too, and they move no n x N matrix: fused. Launches priced at a second each, the one with
    fewer launches wins: the fused loss's plan against the reference's ops, counted here on meta tensors."""
    torch.set_float32_matmul_precision("high")
    assert choose_impl(4096, 4096, 1024, torch.float32, "cuda")[0] == "reference"
    assert choose_impl(4096, 4096, 1024, torch.bfloat16, "cuda")[0] == "fused"
    x = torch.empty(4096, 1024, device="meta", requires_grad=True)
    s = torch.empty((), device="meta", requires_grad=True)
    with CountLaunches() as count:
        loss = gated_clip_loss_reference(x, x, s, torch.empty(4096, device="meta"))
        torch.autograd.grad(loss, [x, s], torch.ones((), device="meta"))
    fused = len(gcl.launch_plan(4096, 4096, 1024, torch.float32, 132))
    assert fused < count.launches, (fused, count.launches)
    fresh_model["launch_us"] = 1e6
    gcl._schedule.cache_clear()
    gcl._reference_ms.cache_clear()
    assert choose_impl(4096, 4096, 1024, torch.float32, "cuda")[0] == "fused"


def test_auto_never_picks_a_reference_that_would_not_fit(fresh_model, monkeypatch):
    """Where the model prices the reference lower (fp32, D = 1024, above), auto still takes the fused loss once the
    reference's four fp32 n x N matrices exceed the device's free memory: 4 x 4 x 4096 x 4096 bytes = 256 MiB."""
    torch.set_float32_matmul_precision("high")
    monkeypatch.setattr(gcl, "_free_memory", lambda device: 257 * 2**20)
    assert choose_impl(4096, 4096, 1024, torch.float32, "cuda")[0] == "reference"
    monkeypatch.setattr(gcl, "_free_memory", lambda device: 255 * 2**20)
    name, why = choose_impl(4096, 4096, 1024, torch.float32, "cuda")
    assert name == "fused" and "would not fit" in why, why


def test_choose_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="impl 'triton'"):
        choose_impl(8, 8, 16, torch.float32, "cpu", "triton")


@needs_kernels
def test_impl_switch(monkeypatch):
    """impl="reference" is the reference, exactly (and auto on CPU); impl="fused" runs the kernels (here in the
    interpreter, on a CUDA host compiled), and agrees with it."""
    gen, seed = fresh_generator()
    x, t = unit(20, 32, gen).float().to(DEVICE), unit(20, 32, gen).float().to(DEVICE)
    w, s = (torch.rand(20, generator=gen) + 0.5).to(DEVICE), torch.tensor(30.0, device=DEVICE)
    assert torch.equal(gated_clip_loss(x, t, s, w, impl="reference"), gated_clip_loss_reference(x, t, s, w))
    if DEVICE == "cpu":
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
                                      reason="interpreter-only: a GPU runs its own configs")


@interpreter_only
@pytest.mark.parametrize("blocks", [{"BLOCK_M": 32, "BLOCK_N": 16, "MAX_DC": 16},
                                    {"BLOCK_M": 16, "BLOCK_N": 64, "MAX_DC": 64}])
def test_other_block_shapes(monkeypatch, blocks):
    """Rectangular tiles, and D = 48 in two chunks of 32 (the second half padding) or in one of 64."""
    monkeypatch.setattr(gcl, "_INTERPRET_BLOCKS", blocks)
    gen, seed = fresh_generator()
    x_all, t_all = unit(50, 48, gen), unit(50, 48, gen)
    w = torch.rand(27, generator=gen) + 0.5
    check(x_all[10:37], t_all[10:37], 60.0, w, x_all=x_all, t_all=t_all, offset=10, seed=seed)
    check(x_all, t_all, 60.0, None, seed=seed)


GPU_BLOCKS = sorted({(m, n) for table in (gcl._FWD_CONFIGS, gcl._BWD_CONFIGS) for cs in table.values()
                     for m, n, *_ in cs})


@interpreter_only
@pytest.mark.parametrize("blocks", GPU_BLOCKS, ids=lambda b: "x".join(map(str, b)))
def test_gpu_block_shapes(monkeypatch, blocks):
    """Every tile shape of the GPU's config tables, at a D (80) that pads (to 96) and comes in two chunks of 64,
    the second partly padding; a B that is ragged (at least two row and two column blocks, the last ones
    partial), square and rectangular."""
    monkeypatch.setattr(gcl, "_INTERPRET_BLOCKS", dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1], MAX_DC=64))
    gen, seed = fresh_generator()
    B = max(blocks) + 5
    x, t, w = unit(B, 80, gen), unit(B, 80, gen), torch.rand(B, generator=gen) + 0.5
    check(x, t, 100.0, w, seed=seed)
    n = B // 2
    check(x[5:5 + n], t[5:5 + n], 100.0, w[:n], x_all=x, t_all=t, offset=5, seed=seed)


# --- split sweeps, the same bits, any D -------------------------------------------------------------------------

@interpreter_only
@pytest.mark.parametrize("sms,rect", [(1, False), (64, False), (1, True), (64, True)])
def test_split_sweeps_merge_exactly(monkeypatch, sms, rect):
    """Grids sized for a device of 1 SM: no split, and forward programs that each take several row blocks
    (merging their column LSEs in place); of 64 SMs: the sweeps split, whose partial LSEs merge and whose partial
    gradient sums add up in order."""
    monkeypatch.setattr(gcl, "_INTERPRET_SMS", sms)
    gen, seed = fresh_generator()
    N, D = 150, 48
    x_all, t_all, w = unit(N, D, gen), unit(N, D, gen), torch.rand(N, generator=gen) + 0.5
    if rect:
        check(x_all[70:115], t_all[70:115], 100.0, w[:45], x_all=x_all, t_all=t_all, offset=70, seed=seed)
    else:
        check(x_all, t_all, 100.0, w, seed=seed)


@needs_kernels
@pytest.mark.parametrize("rect", [False, True])
def test_the_same_bits_every_run(rect):
    """No sum depends on the order programs run in (no atomics; partial results added in a fixed order), so the
    same inputs give the same loss and gradients, bit for bit, with torch.use_deterministic_algorithms(True) or
    without (there is one path), and they match the reference."""
    gen, seed = fresh_generator()
    N, D = 67, 48
    x_all, t_all, w = unit(N, D, gen), unit(N, D, gen), torch.rand(N, generator=gen) + 0.5
    args = (x_all[20:50], t_all[20:50], 50.0, w[:30], x_all, t_all, 20) if rect else (x_all, t_all, 50.0, w)
    first = check(*args, dtype=torch.bfloat16, seed=seed)
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

# PyTorch ops that launch no kernel (allocations without a fill, views), and the global-memory bytes of those that
# do: a fill writes its output, a copy reads its source and writes its destination, a reduction reads its input.
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "slice", "select",
             "detach", "alias", "as_strided", "t", "expand", "unsqueeze", "squeeze", "lift_fresh"}
OP_BYTES = {"new_zeros": lambda args, out: out.nbytes, "zeros": lambda args, out: out.nbytes,
            "copy_": lambda args, out: args[1].nbytes + args[0].nbytes,
            "sum": lambda args, out: args[0].numel() * args[0].element_size() + out.nbytes}


class Launches(TorchDispatchMode):
    """Every kernel a fused forward + backward launches, in order, as (kernel, programs, dot FLOPs, bytes): the
    Triton launches as the interpreter runs them (programs of the grid; 2 m k n per (m, k) by (k, n) tl.dot; the
    bytes of every element that a load or store touches, masked-off ones not), and the PyTorch ops that launch a
    kernel, by the rule of OP_BYTES; ops inside a Triton launch (the interpreter's copies) are not the run's."""

    def __init__(self, monkeypatch):
        super().__init__()
        from triton.runtime import interpreter
        self.record, self.inside = [], False
        builder, call = interpreter.interpreter_builder, interpreter.GridExecutor.__call__
        # the interpreter's unmasked loads and stores call its masked ones, with an all-true mask
        original = {name: getattr(builder, name) for name in ("set_grid_dim", "create_dot", "create_masked_load",
                                                              "create_masked_store")}
        size = lambda ptr: ptr.get_element_ty().primitive_bitwidth // 8

        def launch(executor, *args, **kwargs):
            self.record.append([executor.fn.__name__, 0, 0, 0])
            self.inside = True
            try:
                return call(executor, *args, **kwargs)
            finally:
                self.inside = False

        def count(name, nbytes):
            def hook(*args):
                self.record[-1][3] += nbytes(*args)
                return original[name](*args)
            return hook

        def grid(x, y, z):
            self.record[-1][1] = x * y * z
            return original["set_grid_dim"](x, y, z)

        def dot(a, b, *args):
            (m, k), n = a.data.shape, b.data.shape[1]
            self.record[-1][2] += 2 * m * k * n
            return original["create_dot"](a, b, *args)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
        monkeypatch.setattr(builder, "set_grid_dim", grid)
        monkeypatch.setattr(builder, "create_dot", dot)
        monkeypatch.setattr(builder, "create_masked_load",
                            count("create_masked_load", lambda ptr, mask, *_: int(mask.data.sum()) * size(ptr)))
        monkeypatch.setattr(builder, "create_masked_store",
                            count("create_masked_store", lambda ptr, val, mask, *_: int(mask.data.sum()) * size(ptr)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.inside and name not in NO_LAUNCH:
            assert name in OP_BYTES, f"{func}: a PyTorch op this test does not know the bytes of"
            self.record.append([f"aten.{name}", None, 0, OP_BYTES[name](args, out)])
        return out


def run_fused(n, N, D, gathered, all_grads, weighted, gen, dtype=torch.float32):
    """One fused forward + backward at these sizes on fresh inputs; the leaves' gradients."""
    x_all, t_all = unit(N, D, gen).to(dtype), unit(N, D, gen).to(dtype)
    x, t = x_all[:n].clone().requires_grad_(), t_all[:n].clone().requires_grad_()
    w = torch.rand(n, generator=gen) + 0.5 if weighted else None
    leaves = [x, t]
    kw = {}
    if gathered:
        kw = dict(x_all=x_all.requires_grad_(all_grads), t_all=t_all.requires_grad_(all_grads), offset=0)
        leaves += [x_all, t_all] if all_grads else []
    s = torch.tensor(30.0, requires_grad=True)
    seed_grad = torch.ones(())
    return lambda: torch.autograd.grad(gated_clip_loss(x, t, s, w, **kw, impl="fused"), leaves + [s], seed_grad)


@interpreter_only
@pytest.mark.parametrize("n,N,D,gathered,all_grads,weighted,max_dc,sms", [
    (70, 70, 48, False, True, True, 128, 6),  # square, one chunk of D, split sweeps
    (70, 70, 40, False, True, False, 32, 1),  # D padded (40 -> 48), in two chunks; one SM: nothing split
    (30, 70, 48, True, True, True, 128, 6),
    (30, 70, 40, True, True, True, 32, 6),
    (30, 70, 48, True, False, False, 128, 1),
])
def test_launch_plan_is_what_a_run_launches(monkeypatch, n, N, D, gathered, all_grads, weighted, max_dc, sms):
    """launch_plan lists every kernel forward + backward launches, Triton's and PyTorch's, in order: each with the
    programs of its grid, its similarity GEMMs (the FLOPs of its tl.dot calls, padding included) and its bytes
    (every element loaded or stored, counted in the interpreter; PyTorch ops by OP_BYTES), exactly."""
    monkeypatch.setitem(gcl._INTERPRET_BLOCKS, "MAX_DC", max_dc)
    monkeypatch.setattr(gcl, "_INTERPRET_SMS", sms)
    gen, seed = fresh_generator()
    run = run_fused(n, N, D, gathered, all_grads, weighted, gen)
    with Launches(monkeypatch) as launches:
        run()
    plan = gcl.launch_plan(n, N, D, torch.float32, sms, gathered=gathered, all_grads=all_grads, weighted=weighted)
    got = [(kernel, programs, flops, nbytes) for kernel, programs, flops, nbytes in launches.record]
    want = [(e["kernel"], None if e["kernel"].startswith("aten.") else e["programs"], e["flops"], e["bytes"])
            for e in plan]
    assert got == want, f"run {got}\nplan {want} (seed {seed})"


class ShuffledPrograms:
    """Under it, the interpreter runs the programs of every launch in a random order (its own loop visits them in
    order; each visit is mapped to the next program of a permutation), as a GPU may schedule them."""

    def __init__(self, monkeypatch, seed):
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
        rng = random.Random(seed)
        self.orders = []

        def grid(x, y, z):
            self.dims, self.next = (x, y, z), 0
            self.order = list(itertools.product(range(x), range(y), range(z)))
            rng.shuffle(self.order)
            self.orders.append(self.order)
            return set_dim(x, y, z)

        def index(x, y, z):
            self.next += 1
            return set_idx(*self.order[self.next - 1])
        monkeypatch.setattr(builder, "set_grid_dim", grid)
        monkeypatch.setattr(builder, "set_grid_idx", index)


@interpreter_only
@pytest.mark.parametrize("gathered,dtype,sms", [(False, torch.float32, 6), (True, torch.bfloat16, 6),
                                                (False, torch.bfloat16, 64), (True, torch.float32, 64)])
def test_programs_in_any_order(monkeypatch, gathered, dtype, sms):
    """The programs of every launch run in shuffled orders (three seeds), the sweeps split (6 and 64 SMs'
    grids): the loss and every gradient are the same bits as in order. No program reads what another of its
    launch writes; partial results are merged by the next launch, in a fixed order."""
    monkeypatch.setattr(gcl, "_INTERPRET_SMS", sms)
    gen, seed = fresh_generator()
    n, N, D = (40, 100, 48) if gathered else (100, 100, 48)
    run = run_fused(n, N, D, gathered, True, True, gen, dtype)
    want = run()
    for order_seed in range(3):
        with monkeypatch.context() as m:
            shuffled = ShuffledPrograms(m, seed + order_seed)
            got = run()
        assert any(order != sorted(order) for order in shuffled.orders)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"output {i}: differs by {(a - b).abs().max().item():.3e} when the programs " \
                                      f"run in another order (seed {seed}, order seed {seed + order_seed})"


def test_programs_per_sm():
    """Worked by hand for an H100 SM (65,536 registers, 228 KiB of shared memory, 64 warps, 32 blocks): 8 warps
    of 255 registers (rounded to 256) take 65,536: one; 8 of 128, two; 4 warps of 104 registers, 13,312 each:
    four, unless 66 KiB of shared memory each (+1 KiB) allow three; 4 warps of 32 registers: 16 by warps."""
    assert gcl.programs_per_sm(255, 1024, 8) == 1
    assert gcl.programs_per_sm(128, 1024, 8) == 2
    assert gcl.programs_per_sm(104, 1024, 4) == 4
    assert gcl.programs_per_sm(104, 66 * 1024, 4) == 3
    assert gcl.programs_per_sm(32, 0, 4) == 16


# The design that summed one side's gradient rows atomically and merged the partial LSEs in PyTorch launched 61
# kernels at n = 512 of N = 4096 and 74 at B = 32768 (bf16, D = 512, 132 SMs), and moved 1.165 GB and 267.9 GB:
# its Triton kernels' loads and stores (an atomic add as a read and a write) and its PyTorch ops' tensors,
# counted from its code the way launch_plan counts.
EARLIER_BYTES = {(512, 4096): 1.165e9, (32768, 32768): 267.9e9}


@pytest.mark.parametrize("n,N", [(512, 4096), (4096, 32768), (4096, 4096), (32768, 32768)])
def test_plan_at_the_bench_shapes(monkeypatch, n, N):
    """At D = 512 in bf16 on an H100's 132 SMs (the GPU's config tables, whatever process asks): at most 8
    launches square and 14 gathered, PyTorch's included; at most a third of the earlier design's bytes at
    B = 32768 and half at n = 512 of N = 4096; and the sweeping launches in whole waves: the busiest SM runs at most
    10% more programs than the average."""
    monkeypatch.setattr(gcl, "_interpreted", lambda: False)
    plan = gcl.launch_plan(n, N, 512, torch.bfloat16, 132)
    assert len(plan) <= (14 if N != n else 8), [e["kernel"] for e in plan]
    if (n, N) in EARLIER_BYTES:
        fraction = 1 / 3 if n == N else 1 / 2
        assert sum(e["bytes"] for e in plan) <= fraction * EARLIER_BYTES[n, N], plan
    for e in plan:
        if e["kernel"] in ("_fwd_kernel", "_bwd_kernel"):
            programs = e["programs"]
            assert -(-programs // 132) <= 1.1 * programs / 132, e


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

def extra_bytes_bound(plan, n, N, D, itemsize, square):
    """The module docstring's count of the bytes forward + backward allocate beyond the inputs and gradients,
    given the plan's grids (its forward's splits and groups, its backward's splits): a bound, since the
    forward's workspaces are freed before the backward's are allocated."""
    fwd, bwd = (next(e for e in plan if e["kernel"] == k) for k in ("_fwd_kernel", "_bwd_kernel"))
    dp = -(-D // 16) * 16
    # the LSEs, the loss's partial sums and the loss, saved or returned, and the padded copies of the inputs
    saved = 8 * n + 12 * -(-n // 1024) + 4 + itemsize * (2 * n + 2 * N * (not square)) * dp * (D % 16 != 0)
    forward = 4 * n * (2 - square) * fwd["splits"] + 4 * fwd["groups"] * N * square + 4 * n
    backward = 4 * 2 * bwd["splits"] * n * D + 4  # the local rows' partial sums, and d s
    return saved + max(forward, backward)


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
@pytest.mark.parametrize("rect,sms", [(False, 1), (False, 6), (True, 6), (True, 1)])
def test_extra_memory(monkeypatch, launches_free_their_arguments, rect, sms):
    """Forward + backward allocate at most the docstring's bound beyond inputs and gradients, with D padded (40 to
    48), split sweeps (6 SMs) and not (1 SM). Bytes are counted per storage that an op returns, so the bound holds
    for whatever the launchers allocate."""
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
    with LiveBytes() as mem:
        loss = gated_clip_loss(x, t, s, w, **(dict(x_all=x_all, t_all=t_all, offset=offset) if rect else {}),
                               impl="fused")
        loss.backward()
    grads = [x.grad, t.grad, s.grad] + ([x_all.grad, t_all.grad] if rect else [])
    peak = mem.peak(grads)
    plan = gcl.launch_plan(n, N, D, torch.bfloat16, sms, gathered=rect)
    bound = extra_bytes_bound(plan, n, N, D, 2, not rect)
    assert peak <= bound, f"forward + backward allocated {peak} bytes beyond inputs and gradients, bound {bound} (seed {seed})"


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
@pytest.mark.parametrize("sms", [1, 1024])
def test_merge_paths_at_gpu_sizes(monkeypatch, sms):
    """B = 8192, D = 512, bf16, square and one rank's 1024 rows, on grids sized for a device of 1 SM (no split:
    forward programs that each take 32 or more row blocks and merge their column LSEs in place; every owned block
    sweeps all rows) and of 1024 SMs (the sweeps split: partial LSEs merged, partial gradient sums added in
    order), against float64, and to the same bits twice."""
    monkeypatch.setattr(gcl, "_sm_count", lambda device: sms)
    gen, seed = fresh_generator()
    N, D, n, offset = 8192, 512, 1024, 3072
    x_all, t_all = unit(N, D, gen), unit(N, D, gen)
    w = torch.rand(N, generator=gen) * 2
    for args in [(x_all, t_all, 100.0, w),
                 (x_all[offset:offset + n], t_all[offset:offset + n], 100.0, w[:n], x_all, t_all, offset)]:
        first = check(*args, dtype=torch.bfloat16, seed=seed)
        second = check(*args, dtype=torch.bfloat16, seed=seed)
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
    and gradients (about 130 MiB on an H100, the fp32 sums of dx and dt, where one B x B fp32 matrix is 4 GiB)."""
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
    # the caching allocator rounds each of the few allocations up to a multiple of 512 bytes
    plan = gcl.launch_plan(B, B, D, torch.bfloat16, gcl._sm_count(x.device), weighted=False)
    bound = extra_bytes_bound(plan, B, B, D, 2, True) + 16 * 512
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(s.grad)
    assert extra <= bound, f"peak extra memory {extra} bytes, bound {bound} (seed {seed})"
