"""Benchmark of one loss path, forward + backward: PyTorch reference vs fused kernels vs a GEMM floor.

    python -m kernels.bench                       # B = 4096 .. 131072, D = 512, fp32 and bf16 (needs CUDA)
    python -m kernels.bench --sizes 1024,2048 --no-save

reference  alip.contrastive_loss (materialises the B x B logits, both directions; 6 GEMMs)
fused      kernels.gated_clip_loss (5 GEMMs: see kernels/gated_clip_loss.py)
floor      5 plain torch.matmul products of B x D by D x B (row chunks of at most 8192, so that no B x B
           matrix is needed): the cuBLAS time of the GEMM work the fused kernels do
Times are medians of triton.testing.do_bench; TFLOP/s counts each implementation's own GEMMs (2 B^2 D each);
peak MiB is the peak memory allocated during one forward + backward beyond what was allocated before it
(inputs excluded, gradients included). fp32 runs with torch.set_float32_matmul_precision("high"): tf32 GEMMs
for all three. Results go to kernels/results/<device>.json and between the kernels-bench markers of README.md.
"""

import argparse
import datetime
import json
import os
import re
import subprocess

import torch
import torch.nn.functional as F

from .gated_clip_loss import gated_clip_loss, gated_clip_loss_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- kernels-bench:start -->", "<!-- kernels-bench:end -->"
GEMMS = {"reference": 6, "fused": 5, "floor": 5}


def reference_loss():
    """alip.contrastive_loss when alip.py imports, else this package's own reference (same math)."""
    try:
        import alip
        return alip.contrastive_loss, "alip.contrastive_loss"
    except ImportError as e:
        return gated_clip_loss_reference, f"kernels.gated_clip_loss_reference (alip not importable: {e})"


def floor_fn(x, t, chunk=8192):
    out = torch.empty(min(chunk, x.shape[0]), t.shape[0], device=x.device, dtype=x.dtype)  # reused

    def run():
        for _ in range(GEMMS["floor"]):
            for a in x.split(chunk):
                torch.matmul(a, t.T, out=out[:a.shape[0]])
    return run


def measure(fn, grads):
    """(median ms, peak extra MiB) of fn, or (None, None) on out-of-memory."""
    from triton.testing import do_bench
    try:
        fn()  # compile and autotune outside the measurement
        for g in grads:
            g.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = do_bench(fn, grad_to_none=grads, return_mode="median")
        return ms, peak
    except torch.cuda.OutOfMemoryError:
        return None, None
    finally:
        for g in grads:
            g.grad = None
        torch.cuda.empty_cache()


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows):
    lines = ["| B | D | dtype | impl | ms | TFLOP/s | peak MiB |", "|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if r["ms"] is None:
            ms = tflops = peak = "OOM"
        else:
            ms, peak = f"{r['ms']:.2f}", f"{r['peak_mem_mb']:.0f}"
            tflops = f"{GEMMS[r['impl']] * 2 * r['B'] ** 2 * r['D'] / (r['ms'] * 1e-3) / 1e12:.0f}"
        lines.append(f"| {r['B']} | {r['D']} | {r['dtype']} | {r['impl']} | {ms} | {tflops} | {peak} |")
    head = rows[0]
    return f"{head['device']}, {head['date']}, commit {head['commit']}; one path, forward + backward.\n\n" + "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536,131072", help="comma-separated batch sizes B")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32, bf16, fp16")
    p.add_argument("--no-save", action="store_true", help="print only: no results JSON, no README update")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU (the fused kernels only run interpreted on CPU, "
                         "which says nothing about speed); nothing measured.")
    torch.set_float32_matmul_precision("high")
    ref, ref_name = reference_loss()
    device = torch.cuda.get_device_name()
    print(f"device {device}; reference = {ref_name}; fp32 matmul precision 'high' (tf32)")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    date, rev, D = datetime.date.today().isoformat(), commit(), args.dim
    rows = []
    for name in args.dtypes.split(","):
        for B in (int(b) for b in args.sizes.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(B)
            x = F.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1).to(dtypes[name]).requires_grad_()
            t = F.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1).to(dtypes[name]).requires_grad_()
            s = torch.tensor(100.0, device="cuda", requires_grad=True)
            w = torch.rand(B, device="cuda", generator=gen) + 0.5
            impls = {"reference": lambda: ref(x, t, s, w).backward(),
                     "fused": lambda: gated_clip_loss(x, t, s, w).backward(),
                     "floor": floor_fn(x.detach(), t.detach())}
            for impl, fn in impls.items():
                ms, peak = measure(fn, [x, t, s])
                rows.append({"device": device, "date": date, "commit": rev, "B": B, "D": D, "dtype": name,
                             "impl": impl, "ms": ms, "peak_mem_mb": peak})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            del x, t, s, w, impls
    text = table(rows)
    print("\n" + text)
    if args.no_save:
        return
    os.makedirs(os.path.join(ROOT, "kernels", "results"), exist_ok=True)
    path = os.path.join(ROOT, "kernels", "results", re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ".json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")
    readme = os.path.join(ROOT, "README.md")
    body = open(readme).read() if os.path.exists(readme) else ""
    if START in body and END in body:
        before, rest = body.split(START, 1)
        with open(readme, "w") as f:
            f.write(before + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
        print(f"updated the table in {readme}")
    else:
        print(f"README.md has no {START} ... {END} markers: table printed only")


if __name__ == "__main__":
    main()
