"""Benchmark of one loss path, forward + backward: PyTorch reference, fused kernels, a GEMM floor and Inf-CL, each
beside the time its model predicts on an H100.

    python -m kernels.bench                                    # B = 1024, 2048, ... up to --max-b; bf16 and tf32
    python -m kernels.bench --sizes 4096,8192 --dtypes bf16    # a quick run
    python -m kernels.bench --ranks 8                          # one rank's local loss: B / 8 rows against B
    TRITON_INTERPRET=1 python -m kernels.bench --device cpu --sizes 64,128 --dim 64 --out /tmp/b   # smoke test

Rows, on the same inputs (x, t: B x D unit rows, s = 100, gate-like weights w in [0.5, 1.5)) in the same run. With
--ranks R the loss is one rank's of R: its n = B / R rows against the B gathered ones (x_all, t_all, which get
gradients too); without, the one-GPU loss, n = B. One similarity GEMM is 2 n B D FLOPs.
  reference  kernels.gated_clip_loss_reference, weighted: the same math as the trainer's reference loss in
             alip.py. It materialises the n x B logits of both directions: 6 GEMMs.
  fused      gated_clip_loss(..., impl="fused"), weighted; its launch plan (launch_plan: per launch, the programs
             of its grid, its GEMMs padding included) beside the row: 5 GEMMs (10 with --ranks).
  floor      the least similarity-GEMM work any exact method needs for one path, forward and backward: 4 GEMMs
             per direction of the local rows (a forward sweep of S = x t^T for the LSEs, a backward recompute
             of S, and the two products P t and P^T x; the square loss has one matrix, --ranks two). Timed as
             exactly those cuBLAS matmuls, per chunk of rows of x (S is never n x B): S_c = x_c t^T twice,
             dx_c = S_c t, dt += S_c^T x_c. No exp, no softmax: a lower bound.
  fused w=1  the same unweighted, the call Inf-CL is compared with (only when Inf-CL runs).
  inf_cl     Inf-CL (pip package inf_cl 1.2.1, optional, CUDA only, one GPU), its symmetric CLIP loss: two calls
             of inf_cl.cal_flash_loss, its one-device entry (cal_inf_loss runs the same kernels without a process
             group, but sends the scale's gradient through an all_reduce that needs one), one per direction.
             Each direction runs 5 GEMMs (forward sweep; dq: S and P k; dk: S and P^T q): 10 in all. It casts
             its inputs to fp32 and multiplies in tf32 whatever the input dtype.
Beside every row but Inf-CL's, model_ms: what kernels.gated_clip_loss.MODEL predicts on an H100 SXM (per launch,
the slowest of its FLOPs at the tensor-core rate, its bytes at the L2's bandwidth and its distinct bytes at HBM's,
plus a launch cost): for the fused rows the launch plan's, for the reference its ops counted on meta tensors,
for the floor its GEMMs at the tensor-core rate. The auto column is what gated_clip_loss's impl="auto" runs at the
row's shape (choose_impl): the lower of the fused and the reference models.

dtypes: bf16, fp16, tf32 (fp32 inputs, torch.set_float32_matmul_precision("high"): tf32 GEMMs for every row),
fp32 (fp32 inputs, "highest": ieee GEMMs). B doubles from 1024 up to --max-b (or takes --sizes); an
implementation stops at its first out-of-memory and when its next size would overrun its dtype's share of
--time-budget (the time of the last size times (B / last B)^2), so the fused kernels go on past the reference.

Per row: median ms (on CUDA triton.testing.do_bench: L2 flushed before each call, gradients cleared; on CPU
time.perf_counter) after an untimed warm-up call (compilation); peak_mem_mib, the peak memory allocated during one
call beyond what was allocated before it (inputs excluded, gradients included; None on CPU); gemms, the similarity
GEMMs the implementation runs and tflops, their FLOPs per second; loss and its relative difference from the
reference loss on the same inputs (from fused w=1 where the reference did not fit), which must stay within TOL or
the run exits 1 (as it does on any error). The JSON goes to --out/<device>-<date>.json, rewritten after every row,
so an interrupted run keeps what it measured. Nothing else is written.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from . import gated_clip_loss as gcl
from .gated_clip_loss import (MODEL, auto_costs, choose_impl, fused_available, gated_clip_loss,
                              gated_clip_loss_reference, launch_plan, modelled_ms)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
          "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest")}
GEMMS = {"reference": 6, "floor": 4, "inf_cl": 10}  # per direction pair; the fused rows' come from launch_plan
# Bound on |loss - reference loss| / |reference loss|. Both sum exact 16-bit products in fp32, in different orders
# (up to D 2^-24 s per logit, far less in the mean); tf32 rounds fp32 inputs to 10 bits in both.
TOL = {"bf16": 1e-3, "fp16": 1e-3, "tf32": 1e-3, "fp32": 1e-4}
SCALE = 100.0  # the largest logit scale ALIP allows, the hardest case for the softmax


class CommandParser(argparse.ArgumentParser):
    """The kernels' command lines, as every command of the project reads (kernels/ imports nothing of it): every
    default in --help, and bad input one line, `error: ...`, with exit status 2."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # a help that says its default in words keeps its own words
            return action.help if "(default" in (action.help or "") else super()._get_help_string(action)

    def __init__(self, **kwargs):
        super().__init__(formatter_class=self.Formatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_args(argv):
    p = CommandParser(prog="python -m kernels.bench", description=__doc__)
    p.add_argument("--sizes", help="comma-separated batch sizes B (default: 1024 doubling up to --max-b)")
    p.add_argument("--max-b", type=int, default=1_048_576, help="largest B of the default sizes")
    p.add_argument("--ranks", type=int, default=1, help="time one rank's local loss of this many: B / ranks rows")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--dtypes", default="bf16,tf32", help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cpu runs the fused kernels in the Triton interpreter (needs TRITON_INTERPRET=1)")
    p.add_argument("--time-budget", type=float, default=600, help="seconds for the whole run (see the docstring)")
    p.add_argument("--rep-ms", type=float, default=100, help="time spent on timed calls per row, roughly")
    p.add_argument("--out", default=os.path.join(ROOT, "kernels", "results"), help="folder for the results JSON")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(b) for b in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: expected comma-separated integers, e.g. 4096,8192")
    if args.sizes is not None and min(args.sizes) < 1:
        p.error(f"--sizes {args.sizes}: every B must be at least 1")
    if args.sizes is None and args.max_b < 1024:
        p.error(f"--max-b {args.max_b}: the default sizes start at 1024; give --sizes instead")
    args.sizes = args.sizes or [1024 * 2 ** k for k in range(int(math.log2(args.max_b // 1024)) + 1)]
    if args.ranks < 1 or any(b % args.ranks for b in args.sizes):
        p.error(f"--ranks {args.ranks}: must be at least 1 and divide every B")
    args.dtypes = args.dtypes.split(",")
    if any(d not in DTYPES for d in args.dtypes):
        p.error(f"--dtypes {','.join(args.dtypes)}: choose from {', '.join(DTYPES)}")
    if args.dim < 1:
        p.error(f"--dim {args.dim}: must be at least 1")
    if args.time_budget <= 0 or args.rep_ms < 0:
        p.error("--time-budget must be positive and --rep-ms not negative")
    args.device = pick_device(p, args.device)
    return args


def pick_device(p, name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(name)
    if not fused_available(device):
        p.error("--device cpu runs the fused kernels only in the Triton interpreter: set TRITON_INTERPRET=1 (CPU "
                "timings say nothing about GPU speed)")
    return device


def commit():
    """Short hash of HEAD, with -dirty when tracked files differ from it; "unknown" outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def inf_cl_head_dim(D):
    """Inf-CL splits D into heads of 16, 32, 64, 128 or 256 features: the largest that divides D, or None."""
    return next((h for h in (256, 128, 64, 32, 16) if D % h == 0), None)


def load_inf_cl(device, D):
    """(the inf_cl module, None), or (None, why it is skipped)."""
    if device.type != "cuda":
        return None, "its Triton kernels run on CUDA only"
    if inf_cl_head_dim(D) is None:
        return None, f"D = {D} is not a multiple of 16 (its head size)"
    try:
        import inf_cl
    except ImportError as e:
        return None, f"not importable ({e}); pip install --no-deps inf_cl==1.2.1"
    return inf_cl, None


def inf_cl_loss(inf_cl, x, t, s):
    """Inf-CL's symmetric CLIP loss, (image->text + text->image) / 2; cal_flash_loss returns per-sample losses."""
    head = inf_cl_head_dim(x.shape[1])
    return (inf_cl.cal_flash_loss(x, t, scale=s, head_dim=head).mean()
            + inf_cl.cal_flash_loss(t, x, scale=s, head_dim=head).mean()) / 2


def floor_fn(x, t, chunk, x_all=None, t_all=None):
    """The 4 similarity GEMMs per direction of one exact forward + backward, as cuBLAS matmuls over chunks of rows
    of x: one direction (S = x t^T) for the square loss, two (x t_all^T and t x_all^T) with x_all, t_all."""
    pairs = [(x, t)] if x_all is None else [(x, t_all), (t, x_all)]
    S = torch.empty(min(chunk, x.shape[0]), pairs[0][1].shape[0], device=x.device, dtype=x.dtype)  # (chunk, N)
    grads = [(torch.empty_like(q), torch.zeros_like(k)) for q, k in pairs]  # (n, D), (N, D)

    def run():
        for (q, k), (dq, dk) in zip(pairs, grads):
            dk.zero_()
            for i in range(0, q.shape[0], chunk):
                qc, Sc = q[i:i + chunk], S[:min(chunk, q.shape[0] - i)]
                torch.mm(qc, k.T, out=Sc)  # forward sweep
                torch.mm(qc, k.T, out=Sc)  # backward recompute
                torch.mm(Sc, k, out=dq[i:i + chunk])  # P k
                torch.addmm(dk, Sc.T, qc, out=dk)  # P^T q
    return run


def floor_chunk(B, dtype):
    """Rows per chunk: up to 8192, with the (chunk, B) buffer at most 2 GiB (B: the columns, gathered or not)."""
    return max(128, min(8192, 2**31 // (B * torch.finfo(dtype).bits // 8)))


def make_inputs(B, n, D, dtype, device):
    """(x, t, s, w, kw, leaves): the loss's arguments, kw its x_all, t_all and offset when n < B (x and t are then
    their first n rows, so that their gradients reach the gathered leaves), and the tensors that get gradients."""
    gen = torch.Generator(device=device).manual_seed(B)
    x_all = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()  # (B, D)
    t_all = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()  # (B, D)
    w = torch.rand(n, device=device, generator=gen) + 0.5  # (n,) gate-like weights
    s = torch.tensor(SCALE, device=device, requires_grad=True)
    if n == B:
        return x_all, t_all, s, w, {}, [x_all, t_all, s]
    return x_all[:n], t_all[:n], s, w, dict(x_all=x_all, t_all=t_all, offset=0), [x_all, t_all, s]


def loss_call(loss):
    """fn() computing loss(), its backward, and returning the loss value."""
    def run():
        value = loss()
        value.backward()
        return value.detach()
    return run


def implementations(x, t, s, w, kw, inf_cl):
    """[(impl, weighted, fn)] in the order they run; fn() runs forward + backward once."""
    fused = loss_call(lambda: gated_clip_loss(x, t, s, w, **kw, impl="fused"))
    impls = [("reference", True, loss_call(lambda: gated_clip_loss_reference(x, t, s, w, **kw))),
             ("fused", True, fused),
             ("floor", None, floor_fn(x.detach(), t.detach(), floor_chunk(kw.get("x_all", x).shape[0], x.dtype),
                                      *[kw[k].detach() for k in ("x_all", "t_all") if k in kw]))]
    if inf_cl is not None and not kw:
        impls += [("fused", False, loss_call(lambda: gated_clip_loss(x, t, s, impl="fused"))),
                  ("inf_cl", False, loss_call(lambda: inf_cl_loss(inf_cl, x, t, s)))]
    return impls


SHORT = {"_fwd_kernel": "fwd", "_loss_kernel": "loss", "_bwd_kernel": "bwd", "_finish_kernel": "fin",
         "aten.sum": "sum", "aten.new_zeros": "zeros", "aten.copy_": "copy"}


def plan_of(impl, weighted, n, B, D, dtype, device):
    """(similarity GEMMs, the launch plan in short or None, the modelled ms or None) of an implementation's row."""
    gathered = n < B
    if impl == "reference":
        return GEMMS[impl], None, auto_costs(n, B, D, dtype, device)[1]
    if impl == "floor":
        gemms = GEMMS[impl] * (2 if gathered else 1)
        rate = MODEL["tflops"][gcl._kind(dtype, gcl._input_precision(dtype))] * 1e12
        return gemms, None, gemms * 2 * n * B * D / rate * 1e3
    if impl == "inf_cl":
        return GEMMS[impl], None, None
    plan = launch_plan(n, B, D, dtype, gcl._sm_count(device), gathered=gathered, weighted=weighted)
    text = " ".join(f"{SHORT[r['kernel']]}" + ("" if r["kernel"].startswith("aten.") else f":{r['programs']}")
                    + (f"x{r['gemms']:.3g}" if r["gemms"] else "") for r in plan)
    return round(sum(r["gemms"] for r in plan), 3), text, modelled_ms(plan)


def clear(grads):
    for g in grads:
        g.grad = None


def measure(fn, grads, cuda, rep_ms):
    """(median ms, peak extra MiB or None, loss value) of fn after one untimed warm-up call. On CUDA
    triton.testing.do_bench times it; one call of our own measures the peak memory and returns the loss, which
    do_bench does not. On CPU (the interpreter), time.perf_counter around each call."""
    clear(grads)
    fn()
    clear(grads)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = fn()
    first = (time.perf_counter() - t0) * 1e3
    if not cuda:
        times = [first]
        for _ in range(min(50, int(rep_ms / max(first, 1e-3)))):
            clear(grads)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), None, None if loss is None else loss.item()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=1, rep=max(rep_ms, 1), grad_to_none=grads, return_mode="median")
    return ms, peak, None if loss is None else loss.item()


def run_one(impl, weighted, fn, grads, cuda, rep_ms, B, n, D, dtype, device):
    """One row: measured, or status "oom" / "error" with the message."""
    torch_dtype = DTYPES[dtype][0]
    gemms, plan, model = plan_of(impl, weighted is not False, n, B, D, torch_dtype, device)
    row = {"impl": impl, "weighted": weighted, "B": B, "n": n, "D": D, "dtype": dtype, "status": "ok", "ms": None,
           "peak_mem_mib": None, "gemms": gemms, "tflops": None, "loss": None, "plan": plan, "model_ms": model,
           "auto": choose_impl(n, B, D, torch_dtype, device)[0]}
    try:
        row["ms"], row["peak_mem_mib"], row["loss"] = measure(fn, grads, cuda, rep_ms)
        row["tflops"] = gemms * 2 * n * B * D / (row["ms"] * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # a failed implementation is recorded and makes the run fail; the others go on
        row["status"], row["error"] = "error", f"{type(e).__name__}: {e}"[:500]
    clear(grads)
    if row["status"] == "oom":  # after the except block, which held the failed call's tensors
        torch.cuda.empty_cache()
    return row


def check(rows, reference_unweighted):
    """Set check_vs, rel_diff and matches on the rows of one (dtype, B): the weighted rows against the reference,
    the unweighted ones against the unweighted reference value, or, where the reference did not fit, inf_cl
    against the unweighted fused loss."""
    def loss_of(impl, weighted):
        return next((r["loss"] for r in rows if (r["impl"], r["weighted"], r["status"]) == (impl, weighted, "ok")), None)
    for r in rows:
        if r["loss"] is None or r["impl"] == "reference":
            continue
        if r["weighted"]:
            against, want = "reference", loss_of("reference", True)
        elif reference_unweighted is not None:
            against, want = "reference", reference_unweighted
        else:
            against, want = "fused", loss_of("fused", False) if r["impl"] == "inf_cl" else None
        if want is not None:
            r["check_vs"], r["rel_diff"] = against, abs(r["loss"] - want) / max(abs(want), 1e-30)
            tol = max(TOL[r["dtype"]], TOL["tf32"]) if r["impl"] == "inf_cl" else TOL[r["dtype"]]  # inf_cl: tf32
            r["matches"] = math.isfinite(r["rel_diff"]) and r["rel_diff"] <= tol


def label(row):
    return row["impl"] + (" w=1" if row["weighted"] is False and row["impl"] == "fused" else "")


def table_line(r):
    shape = f"| {r['B']} | {r['n']} | {r['D']} | {r['dtype']} | {label(r)} |"
    model = "" if r["model_ms"] is None else f"{r['model_ms']:.3g}"
    tail = f" {model} | {r['auto']} | {r['gemms']:.3g} | {r['plan'] or ''} |"
    if r["status"] != "ok":
        return f"{shape} {r['status']} {r.get('error', '')} | | | | |" + tail
    peak = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
    loss = "" if r["loss"] is None else f"{r['loss']:.6g}"
    checked = "" if "rel_diff" not in r else f"{r['rel_diff']:.1e} vs {r['check_vs']}" + ("" if r["matches"] else " MISMATCH")
    return f"{shape} {r['ms']:.3f} | {r['tflops']:.3g} | {peak} | {loss} | {checked} |" + tail


# model ms: MODEL's H100 time for the row (module docstring); plan: per launch, kernel:programs and xGEMMs (fwd
# _fwd_kernel, loss _loss_kernel, sum the loss's aten.sum, bwd _bwd_kernel, fin _finish_kernel)
TABLE_HEAD = ("| B | n | D | dtype | impl | ms | TFLOP/s | peak MiB | loss | rel. diff | model ms | auto | GEMMs | "
              "plan |\n|---:|---:|---:|---|---|---:|---:|---:|---:|---|---:|---|---:|---|")


def header(device, argv, inf_cl_skipped):
    """The run's settings and environment; rows are appended to "rows"."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": name, "slug": re.sub(r"[^a-z0-9]+", "-", (name if cuda else "cpu").lower()).strip("-"),
            "interpreted": not cuda, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "inf_cl": version("inf_cl"),
            "inf_cl_skipped": inf_cl_skipped, "commit": commit(), "date": datetime.date.today().isoformat(),
            "argv": argv, "scale": SCALE, "tolerance": TOL, "gemms": GEMMS, "model": MODEL, "rows": []}


def save(result, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def bench_dtype(name, args, device, inf_cl, result, deadline, write):
    """Every size of one dtype; appends rows to result["rows"]."""
    dtype, precision = DTYPES[name]
    torch.set_float32_matmul_precision(precision)
    last, stopped = {}, set()  # (impl, weighted) -> (B, seconds spent on it)
    for B in args.sizes:
        n = B // args.ranks
        x, t, s, w, kw, leaves = make_inputs(B, n, args.dim, dtype, device)
        rows = []
        impls = implementations(x, t, s, w, kw, inf_cl)
        for impl, weighted, fn in impls:
            key = (impl, weighted)
            if key in stopped:
                continue
            if key in last and time.time() + last[key][1] * (B / last[key][0]) ** 2 > deadline:
                print(f"{impl}: stops at B = {last[key][0]} in {name}: B = {B} would overrun --time-budget", flush=True)
                stopped.add(key)
                continue
            t0 = time.time()
            row = run_one(impl, weighted, fn, leaves, device.type == "cuda", args.rep_ms, B, n, args.dim, name, device)
            last[key] = (B, time.time() - t0)
            if row["status"] != "ok":
                stopped.add(key)
            rows.append(row)
            print(table_line(row), flush=True)
        del impls, fn  # they hold the inputs and the floor's buffer
        ref_ok = any(r["impl"] == "reference" and r["status"] == "ok" for r in rows)
        unweighted = any(r["weighted"] is False for r in rows)
        with torch.no_grad():  # the unweighted reference value, to check the rows Inf-CL is compared with
            ref_u = gated_clip_loss_reference(x, t, s).item() if ref_ok and unweighted else None
        check(rows, ref_u)
        result["rows"] += rows
        write()
        del x, t, s, w, kw, leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    inf_cl, why = load_inf_cl(device, args.dim) if args.ranks == 1 else (None, "it has no loss against gathered rows")
    result = header(device, sys.argv[1:] if argv is None else argv, why)
    print(f"{result['device']}; torch {result['torch']}, triton {result['triton']}, commit {result['commit']}; "
          f"reference = kernels.gated_clip_loss_reference; D = {args.dim}, s = {SCALE}, "
          f"{'one GPU' if args.ranks == 1 else f'one rank of {args.ranks}'}")
    print(f"inf_cl {result['inf_cl']}: timed as impl inf_cl" if inf_cl else f"inf_cl: skipped, {why}")
    path = None if args.no_save else os.path.join(args.out, f"{result['slug']}-{result['date']}.json")
    write = (lambda: None) if args.no_save else (lambda: save(result, path))
    print(TABLE_HEAD, flush=True)
    start, before = time.time(), torch.get_float32_matmul_precision()
    try:
        for i, name in enumerate(args.dtypes):  # each dtype may use what the ones before it left of the budget
            bench_dtype(name, args, device, inf_cl, result, start + args.time_budget * (i + 1) / len(args.dtypes), write)
    finally:
        torch.set_float32_matmul_precision(before)
    print(("\n" + TABLE_HEAD + "\n" + "\n".join(map(table_line, result["rows"]))) if result["rows"] else "no rows")
    if path:
        print(f"wrote {path}")
    bad = [r for r in result["rows"] if r["status"] == "error" or r.get("matches") is False]
    if bad:
        raise SystemExit(f"kernels.bench: {len(bad)} rows failed (an error, or a loss off the reference by more "
                         f"than TOL): " + "; ".join(f"{label(r)} {r['dtype']} B={r['B']}" for r in bad))
    return path


if __name__ == "__main__":
    main()
