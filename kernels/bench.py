"""Benchmark of one loss path, forward + backward: PyTorch reference, fused kernels, a GEMM floor and Inf-CL.

    python -m kernels.bench                                    # B = 4096, 8192, ... up to --max-b; bf16 and tf32
    python -m kernels.bench --sizes 4096,8192 --dtypes bf16    # a quick run
    TRITON_INTERPRET=1 python -m kernels.bench --device cpu --sizes 64,128 --dim 64 --out /tmp/b   # smoke test

Rows, on the same inputs (x, t: B x D unit rows, s = 100, gate-like weights w in [0.5, 1.5)) in the same run:
  reference  kernels.gated_clip_loss_reference, weighted: the same math as the trainer's reference loss in
             alip.py. It materialises the B x B logits of both directions: 6 GEMMs.
  fused      kernels.gated_clip_loss, weighted: 5 GEMMs (see "Cost in similarity GEMMs" in gated_clip_loss.py).
  floor      the least similarity-GEMM work any exact method needs for one path, forward and backward: 4 GEMMs
             (a forward sweep of S = x t^T for the LSEs, a backward recompute of S, and the two products
             P t and P^T x). Timed as exactly those 4 cuBLAS matmuls, per chunk of rows of x (S is never
             B x B): S_c = x_c t^T twice, dx_c = S_c t, dt += S_c^T x_c. No exp, no softmax: a lower bound.
  fused w=1  kernels.gated_clip_loss unweighted, the call Inf-CL is compared with (only when Inf-CL runs).
  inf_cl     Inf-CL (pip package inf_cl 1.2.1, optional, CUDA only), its symmetric CLIP loss: two calls of
             inf_cl.cal_flash_loss, its one-device entry (cal_inf_loss runs the same kernels without a process
             group, but sends the scale's gradient through an all_reduce that needs one), one per direction.
             Each direction runs 5 GEMMs (forward sweep; dq: S and P k; dk: S and P^T q): 10 in all. It casts
             its inputs to fp32 and multiplies in tf32 whatever the input dtype.

dtypes: bf16, fp16, tf32 (fp32 inputs, torch.set_float32_matmul_precision("high"): tf32 GEMMs for every row),
fp32 (fp32 inputs, "highest": ieee GEMMs). B doubles from 4096 up to --max-b (or takes --sizes); an
implementation stops at its first out-of-memory and when its next size would overrun its dtype's share of
--time-budget (the time of the last size times (B / last B)^2), so the fused kernels go on past the reference.

Per row: median ms of timed calls (CUDA events, L2 flushed before each call; time.perf_counter on CPU) after one
untimed warm-up call (compilation, autotuning); peak_mem_mib, the peak memory allocated during one call beyond
what was allocated before it (inputs excluded, gradients included; None on CPU); gemms, the similarity GEMMs the
implementation runs (2 B^2 D FLOPs each) and tflops, those FLOPs per second; loss and its relative difference
from the reference loss on the same inputs (from fused w=1 where the reference did not fit), which must stay
within TOL or the run exits 1 (as it does on any error). The JSON goes to --out/<device>-<date>.json, rewritten
after every row, so an interrupted run keeps what it measured. Nothing else is written.
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

from .gated_clip_loss import fused_available, gated_clip_loss, gated_clip_loss_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
          "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest")}
GEMMS = {"reference": 6, "fused": 5, "floor": 4, "inf_cl": 10}  # see the docstring; tests/test_bench.py counts 6 and 4
# Bound on |loss - reference loss| / |reference loss|. The reference rounds its 16-bit logits x t^T to the input
# dtype (half an ulp: 2e-3 bf16, 2.4e-4 fp16, times |s x.t| <= s); the differences average out in the mean.
TOL = {"bf16": 1e-2, "fp16": 2e-3, "tf32": 1e-3, "fp32": 1e-4}
SCALE = 100.0  # the largest logit scale ALIP allows, the hardest case for the softmax
FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="comma-separated batch sizes B (default: 4096 doubling up to --max-b)")
    p.add_argument("--max-b", type=int, default=1_048_576, help="largest B of the default sizes")
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
        raise SystemExit(f"kernels.bench: --sizes {args.sizes!r}: expected comma-separated integers, e.g. 4096,8192")
    if args.sizes is not None and min(args.sizes) < 1:
        raise SystemExit(f"kernels.bench: --sizes {args.sizes}: every B must be at least 1")
    if args.sizes is None and args.max_b < 4096:
        raise SystemExit(f"kernels.bench: --max-b {args.max_b}: the default sizes start at 4096; give --sizes instead")
    args.sizes = args.sizes or [4096 * 2 ** k for k in range(int(math.log2(args.max_b // 4096)) + 1)]
    args.dtypes = args.dtypes.split(",")
    if any(d not in DTYPES for d in args.dtypes):
        raise SystemExit(f"kernels.bench: --dtypes {','.join(args.dtypes)}: choose from {', '.join(DTYPES)}")
    if args.dim < 1:
        raise SystemExit(f"kernels.bench: --dim {args.dim}: must be at least 1")
    if args.time_budget <= 0 or args.rep_ms < 0:
        raise SystemExit("kernels.bench: --time-budget must be positive and --rep-ms not negative")
    return args


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels.bench: --device cuda, but torch sees no CUDA device")
    device = torch.device(name)
    if not fused_available(device):
        raise SystemExit("kernels.bench: --device cpu runs the fused kernels only in the Triton interpreter: "
                         "set TRITON_INTERPRET=1 (CPU timings say nothing about GPU speed)")
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


def floor_fn(x, t, chunk):
    """The 4 similarity GEMMs of one exact forward + backward, as cuBLAS matmuls over chunks of rows of x."""
    S = torch.empty(min(chunk, x.shape[0]), t.shape[0], device=x.device, dtype=x.dtype)  # (chunk, B), reused
    dx, dt = torch.empty_like(x), torch.zeros_like(t)  # (B, D)

    def run():
        dt.zero_()
        for i in range(0, x.shape[0], chunk):
            xc, Sc = x[i:i + chunk], S[:min(chunk, x.shape[0] - i)]
            torch.mm(xc, t.T, out=Sc)  # forward sweep
            torch.mm(xc, t.T, out=Sc)  # backward recompute
            torch.mm(Sc, t, out=dx[i:i + chunk])  # P t
            torch.addmm(dt, Sc.T, xc, out=dt)  # P^T x
    return run


def floor_chunk(B, dtype):
    """Rows per chunk: up to 8192, with the (chunk, B) buffer at most 2 GiB."""
    return max(128, min(8192, 2**31 // (B * torch.finfo(dtype).bits // 8)))


def make_inputs(B, D, dtype, device):
    gen = torch.Generator(device=device).manual_seed(B)
    x = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()  # (B, D)
    t = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()  # (B, D)
    w = torch.rand(B, device=device, generator=gen) + 0.5  # (B,) gate-like weights
    s = torch.tensor(SCALE, device=device, requires_grad=True)
    return x, t, s, w


def loss_call(loss):
    """fn() computing loss(), its backward, and returning the loss value."""
    def run():
        value = loss()
        value.backward()
        return value.detach()
    return run


def implementations(x, t, s, w, inf_cl):
    """[(impl, weighted, fn)] in the order they run; fn() runs forward + backward once."""
    impls = [("reference", True, loss_call(lambda: gated_clip_loss_reference(x, t, s, w))),
             ("fused", True, loss_call(lambda: gated_clip_loss(x, t, s, w))),
             ("floor", None, floor_fn(x.detach(), t.detach(), floor_chunk(x.shape[0], x.dtype)))]
    if inf_cl is not None:
        impls += [("fused", False, loss_call(lambda: gated_clip_loss(x, t, s))),
                  ("inf_cl", False, loss_call(lambda: inf_cl_loss(inf_cl, x, t, s)))]
    return impls


def timed_call(fn, grads, flush):
    """(ms, fn's result) of one call, gradients cleared first."""
    for g in grads:
        g.grad = None
    if flush is None:
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out
    flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), out


def measure(fn, grads, flush, rep_ms):
    """(median ms, peak extra MiB or None, loss value or None) of fn, after one warm-up call."""
    cuda = flush is not None
    timed_call(fn, grads, flush)
    for g in grads:
        g.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ms, loss = timed_call(fn, grads, flush)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    times = [ms] + [timed_call(fn, grads, flush)[0] for _ in range(min(50, int(rep_ms / max(ms, 1e-3))))]
    return statistics.median(times), peak, None if loss is None else loss.item()


def run_one(impl, weighted, fn, grads, flush, rep_ms, B, D, dtype):
    """One row: measured, or status "oom" / "error" with the message."""
    row = {"impl": impl, "weighted": weighted, "B": B, "D": D, "dtype": dtype, "status": "ok", "ms": None,
           "peak_mem_mib": None, "gemms": GEMMS[impl], "tflops": None, "loss": None}
    try:
        row["ms"], row["peak_mem_mib"], row["loss"] = measure(fn, grads, flush, rep_ms)
        row["tflops"] = GEMMS[impl] * 2 * B * B * D / (row["ms"] * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # a failed implementation is recorded and makes the run fail; the others go on
        row["status"], row["error"] = "error", f"{type(e).__name__}: {e}"[:500]
    for g in grads:
        g.grad = None
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
    if r["status"] != "ok":
        return f"| {r['B']} | {r['D']} | {r['dtype']} | {label(r)} | {r['status']} {r.get('error', '')} | | | | |"
    peak = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
    loss = "" if r["loss"] is None else f"{r['loss']:.6g}"
    checked = "" if "rel_diff" not in r else f"{r['rel_diff']:.1e} vs {r['check_vs']}" + ("" if r["matches"] else " MISMATCH")
    return (f"| {r['B']} | {r['D']} | {r['dtype']} | {label(r)} | {r['ms']:.3f} | {r['tflops']:.3g} | {peak} | "
            f"{loss} | {checked} |")


TABLE_HEAD = ("| B | D | dtype | impl | ms | TFLOP/s | peak MiB | loss | rel. diff |\n"
              "|---:|---:|---|---|---:|---:|---:|---:|---|")


def header(device, argv, inf_cl_skipped):
    """The run's settings and environment; rows are appended to "rows"."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": name, "slug": re.sub(r"[^a-z0-9]+", "-", (name if cuda else "cpu").lower()).strip("-"),
            "interpreted": not cuda, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "inf_cl": version("inf_cl"),
            "inf_cl_skipped": inf_cl_skipped, "commit": commit(), "date": datetime.date.today().isoformat(),
            "argv": argv, "scale": SCALE, "tolerance": TOL, "gemms": GEMMS, "rows": []}


def save(result, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def bench_dtype(name, args, device, inf_cl, result, deadline, write):
    """Every size of one dtype; appends rows to result["rows"]."""
    dtype, precision = DTYPES[name]
    torch.set_float32_matmul_precision(precision)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None
    last, stopped = {}, set()  # (impl, weighted) -> (B, seconds spent on it)
    for B in args.sizes:
        x, t, s, w = make_inputs(B, args.dim, dtype, device)
        rows = []
        impls = implementations(x, t, s, w, inf_cl)
        for impl, weighted, fn in impls:
            key = (impl, weighted)
            if key in stopped:
                continue
            if key in last and time.time() + last[key][1] * (B / last[key][0]) ** 2 > deadline:
                print(f"{impl}: stops at B = {last[key][0]} in {name}: B = {B} would overrun --time-budget", flush=True)
                stopped.add(key)
                continue
            t0 = time.time()
            row = run_one(impl, weighted, fn, [x, t, s], flush, args.rep_ms, B, args.dim, name)
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
        del x, t, s, w
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    inf_cl, why = load_inf_cl(device, args.dim)
    result = header(device, sys.argv[1:] if argv is None else argv, why)
    print(f"{result['device']}; torch {result['torch']}, triton {result['triton']}, commit {result['commit']}; "
          f"reference = kernels.gated_clip_loss_reference; D = {args.dim}, s = {SCALE}")
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
