"""kernels.gated_clip_loss against a float64 PyTorch reference: the loss and every gradient.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) at small, irregular sizes; on a CUDA
host the same tests run compiled, plus the large-size tests at the end. Every test draws fresh random inputs
and prints its seed on failure.
"""

import gc
import importlib
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
          tol_loss=None, tol_grad=None, grad_loss=1.0):
    """Round the float64 inputs to dtype, run the fused loss on DEVICE and the reference in float64 on the
    same rounded values, and compare the loss and the gradients (of grad_loss * loss) of x, t, (x_all, t_all)
    and the scale."""
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
    loss.backward(torch.tensor(grad_loss, device=DEVICE))
    want.backward(torch.tensor(grad_loss, dtype=torch.float64, device=DEVICE))
    # the scale of the terms that cancel (B = 1 square: the loss and all gradients are exactly 0); the loss and
    # its gradients are linear in the weights, the gradients in grad_loss
    floor = 1e-2 * max(scale, 1.0) / x.shape[0] * (1.0 if weight is None else weight.abs().max().item())
    close("loss", loss, want, tol_loss or TOL_LOSS[dtype], seed, floor)
    for name, a, b in zip(["dx", "dt", "dx_all", "dt_all"], ours, ref):
        close(name, a.grad, b.grad, tol_grad or TOL_GRAD[dtype], seed, floor * grad_loss)
    close("dlogit_scale", s_ours.grad, s_ref.grad, tol_grad or TOL_GRAD[dtype], seed, floor * grad_loss)


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
        for fn in (alip.contrastive_loss, gated_clip_loss):
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
            gated_clip_loss(torch.randn(2, gcl.MAX_D + 1), torch.randn(2, gcl.MAX_D + 1), torch.tensor(1.0))
        with pytest.raises(AssertionError, match="dtypes"):
            gated_clip_loss(x, x.double(), torch.tensor(1.0))


# --- memory ---------------------------------------------------------------------------------------------

def extra_bytes_bound(n, N, D, square, programs):
    """The module docstring's bound on the bytes forward + backward allocate beyond the inputs and gradients."""
    return 4 * programs * N * square + 32 * n + 4 * N + 12 * min(n, gcl._ROWDOT_ROWS) * D


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
@pytest.mark.parametrize("rect", [False, True])
def test_extra_memory(monkeypatch, launches_free_their_arguments, rect):
    """Forward + backward allocate at most the docstring's bound beyond inputs and gradients; the column LSE's
    workspace is programs x N (not row blocks x N), measured on its own too. Bytes are counted per storage
    that an op returns, so the bound holds for whatever the launchers allocate. x_i.t_i is taken 8 rows at a
    time, so that its fp32 copies do not hide the other terms."""
    monkeypatch.setattr(gcl, "_ROWDOT_ROWS", 8)
    gen, seed = fresh_generator()
    N, D = 70, 40
    n, offset = (30, 30) if rect else (N, 0)
    x_all, t_all = unit(N, D, gen).bfloat16(), unit(N, D, gen).bfloat16()
    x, t = x_all[offset:offset + n].clone().requires_grad_(), t_all[offset:offset + n].clone().requires_grad_()
    x_all.requires_grad_()
    t_all.requires_grad_()
    s = torch.tensor(30.0, requires_grad=True)
    w = torch.rand(n, generator=gen) + 0.5
    programs = gcl._programs("cpu", n)
    assert programs < triton.cdiv(n, gcl._INTERPRET_BLOCKS["BLOCK_M"]) or rect, "each program must sweep row blocks"
    with LiveBytes() as mem:
        loss = gated_clip_loss(x, t, s, w, **(dict(x_all=x_all, t_all=t_all, offset=offset) if rect else {}))
        loss.backward()
    grads = [x.grad, t.grad, s.grad] + ([x_all.grad, t_all.grad] if rect else [])
    peak, bound = mem.peak(grads), extra_bytes_bound(n, N, D, not rect, programs)
    assert peak <= bound, f"forward + backward allocated {peak} bytes beyond inputs and gradients, bound {bound} (seed {seed})"
    if not rect:
        with LiveBytes() as mem:
            row, col = gcl._lse(x.detach(), t.detach(), s.detach().reshape(1), col_lse=True)
        peak, bound = mem.peak([row, col]), 4 * programs * N + 4 * N
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
def test_tf32():
    """fp32 inputs under torch.set_float32_matmul_precision("high"): tf32 GEMMs, ~1e-3 relative error."""
    torch.set_float32_matmul_precision("high")
    gen, seed = fresh_generator()
    x, t = unit(4099, 1000, gen), unit(4099, 1000, gen)
    check(x, t, 100.0, torch.rand(4099, generator=gen) + 0.5, seed=seed, tol_loss=2e-3, tol_grad=2e-2)


@needs_cuda
def test_large_batch_memory():
    """B = 32768, D = 512, bf16: forward + backward allocate no more than the docstring's bound beyond the inputs
    and gradients (about 64 MiB on an H100, where one B x B fp32 matrix is 4 GiB)."""
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
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in (x.grad, t.grad, s.grad))
    # the caching allocator rounds each of the few dozen allocations up to a multiple of 512 bytes
    bound = extra_bytes_bound(B, B, D, True, gcl._programs(x.device, B)) + 64 * 512
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(s.grad)
    assert extra <= bound, f"peak extra memory {extra} bytes, bound {bound} (seed {seed})"
