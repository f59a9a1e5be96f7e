"""Compile every kernel variant with every config the autotuner keeps, for sm_90 (H100), without a GPU.

    python -m kernels.compile_check                 # the whole matrix: D in DIMS x bf16, fp16, fp32-tf32, fp32-ieee
    python -m kernels.compile_check --dims 200,1000 # any D (the launcher pads D to a multiple of 16)
    python -m kernels.compile_check --quick         # every config once, where it is heaviest (CI)
    python -m kernels.compile_check --jobs 8        # parallel compiles (default: the CPU count)

Triton's compiler runs the ptxas that ships in its wheel. Registers and local memory come from the cubin
(cuobjdump --dump-resource-usage), shared memory from the compiled kernel's metadata plus the cubin's static
shared memory. Local memory is where ptxas spills registers (Triton reports it as n_spills = bytes / 4); a config
fails if it has any, or if it needs more shared memory than an H100 block may opt in to (227 KiB). Each compile
uses the specialisation that the launchers' inputs get (16-byte aligned pointers, the padded D a multiple of 16),
with M and N multiples of 16 or not: Triton compiles the two apart, and they can differ in spills. Prints one
line per kernel and exits non-zero on any failure.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import torch

from kernels import gated_clip_loss as g

H100_SHARED = 232448  # bytes of shared memory per block with the opt-in (227 KiB)
DIMS = (16, 64, 128, 200, 256, 512, 768, 1000, 1024)
KINDS = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "fp32-tf32": (torch.float32, "tf32"),
         "fp32-ieee": (torch.float32, "ieee")}  # name -> (input dtype, tl.dot input_precision)
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# the backward variants the launchers run: (Q_TERM, K_TERM, ATOMIC) (see _grads)
BWD_VARIANTS = {"square": (True, True, True), "square det": (True, True, False), "gathered": (True, False, True),
                "gathered dq": (False, True, False), "gathered dk det": (True, False, False)}
INPUTS = {"Q", "K", "DIAG", "G"}  # pointers of the input dtype; every other pointer is fp32
INTS = {"M", "N", "D", "R", "DP", "PARTS"}


def matrix(dims, quick):
    """(kernel, variant, kind, D, config, M and N multiples of 16) of every compile; D is the padded D."""
    jobs = []
    for kind, (dtype, precision) in KINDS.items():
        k = g._kind(dtype, precision)
        for D in sorted({g._padded_dim(d) for d in dims}):
            for col in (True, False):
                for c in g._FWD_CONFIGS[k]:
                    jobs.append(("fwd", "column LSE" if col else "row LSE", kind, D, c, (k,)))
            block_d = g._block_d(k, D)
            for variant, (_, _, atomic) in BWD_VARIANTS.items():
                for c in g._BWD_CONFIGS[k, block_d, atomic]:
                    jobs.append(("bwd", variant, kind, D, c, (k, block_d, atomic)))
            if kind != "fp32-tf32":  # the same code as fp32-ieee
                for variant in ("diag", "no diag"):
                    jobs.append(("finish", variant, kind, D, (g._FINISH_BLOCKS["BLOCK_R"], g._FINISH_BLOCKS["BLOCK_C"],
                                                             0, 4, 3), (kind,)))
    if quick:
        # every config of the tables once, where it is heaviest: the forward with column LSE, the square backward
        # (with atomics where the config has them), at the largest D that uses it, bf16 for the 16-bit entries; the
        # finishing kernel; then, with M and N multiples of 16, the gathered variant of the first bf16 config
        heaviest, corners = {}, []
        for job in jobs:  # in increasing D, "square" before "square det"
            kernel, variant, kind, D, c, entry = job
            key = kernel, entry[:2], c
            if variant in ("column LSE", "square", "square det", "diag") and kind != "fp16":
                if not (variant == "square det" and key in heaviest and heaviest[key][3] == D):
                    heaviest[key] = job[:5] + (False,)
            elif D == max(dims) and kind == "bf16" and variant == "gathered" and c == g._BWD_CONFIGS[entry][0]:
                corners.append(job[:5] + (True,))
        return list(heaviest.values()) + corners
    return [job[:5] + (mn16,) for job in jobs for mn16 in (False, True)]


def _signature_and_meta(job):
    kernel, variant, kind, D, (bm, bn, bk, warps, stages), mn16 = job
    dtype, precision = KINDS[kind]
    if kernel == "fwd":
        fn = g._lse_fwd_kernel
        meta = dict(g._fwd_constexprs(D, precision, variant == "column LSE"), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    elif kernel == "bwd":
        fn = g._bwd_kernel
        block_d = g._block_d(g._kind(dtype, precision), D)
        meta = dict(g._bwd_constexprs(D, precision, block_d, *BWD_VARIANTS[variant]), BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk)
    else:
        fn = g._finish_kernel
        meta = dict(HAS_DIAG=variant == "diag", BLOCK_R=bm, BLOCK_C=bn)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name] = "constexpr"
            continue
        signature[name] = "i32" if name in INTS else POINTER[dtype] if name in INPUTS else "*fp32"
        if signature[name][0] == "*" or name in ("D", "DP") and D % 16 == 0 or name in ("M", "N", "R") and mn16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, signature, meta, attrs, dict(num_warps=warps, num_stages=stages)


def compile_one(job):
    """(registers, local bytes, shared bytes) of one compile for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, meta, attrs, options = _signature_and_meta(job)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=meta, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs, stack, static_shared, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                                                           usage).groups())
    return regs, stack + local, compiled.metadata.shared + static_shared


def compile_all(jobs, workers):
    """{job: (registers, local bytes, shared bytes)}, compiling each distinct specialisation once."""
    # D enters a compile only through EVEN_K, EVEN_D and BLOCK_D: jobs that compile the same code share a result
    key = {job: repr(_signature_and_meta(job)[1:]) for job in jobs}
    unique = {}
    for job in jobs:
        unique.setdefault(key[job], job)
    results = {}
    # spawn: the workers import triton afresh rather than inherit a forked copy of this process's threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_one, job): k for k, job in unique.items()}
        for i, done in enumerate(concurrent.futures.as_completed(futures)):
            results[futures[done]] = done.result()
            print(f"compiled {i + 1}/{len(unique)}", file=sys.stderr, flush=True)
    return {job: results[key[job]] for job in jobs}, len(unique)


def parse_dims(text):
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        raise SystemExit(f"kernels.compile_check: --dims {text!r}: expected comma-separated integers, e.g. 200,1000")
    if not all(1 <= d <= g.MAX_D for d in dims):
        raise SystemExit(f"kernels.compile_check: --dims {text}: every D must lie in 1..{g.MAX_D}")
    return dims


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=parse_dims, default=list(DIMS), help="comma-separated feature dimensions D")
    p.add_argument("--quick", action="store_true", help="every config once where it is heaviest, and corners")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the flag makes @triton.jit return interpreted functions, which cannot be compiled: run afresh without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        sys.exit(subprocess.run([sys.executable, "-m", "kernels.compile_check"] + sys.argv[1:], env=env).returncode)
    import triton

    jobs = matrix(args.dims, args.quick)
    print(f"triton {triton.__version__}, sm_90; D = {','.join(map(str, args.dims))} (padded to multiples of 16); "
          f"{len(jobs)} kernels; limits: 0 bytes of local memory, {H100_SHARED} bytes of shared memory")
    print(f"{'kernel':6} {'variant':15} {'dtype':9} {'D':>5} {'BM,BN,BK,warps,stages':22} {'M,N%16':6} "
          f"{'regs':>4} {'spill':>6} {'shared':>7}")
    results, distinct = compile_all(jobs, args.jobs)
    failed = 0
    for job in jobs:
        regs, spill, shared = results[job]
        bad = spill > 0 or shared > H100_SHARED
        failed += bad
        kernel, variant, kind, D, config, mn16 = job
        print(f"{kernel:6} {variant:15} {kind:9} {D:5} {','.join(map(str, config)):22} {'yes' if mn16 else 'no':6} "
              f"{regs:4} {spill:6} {shared:7}" + ("  FAIL" if bad else ""))
    print(f"{failed} of {len(jobs)} kernels spill or exceed the shared memory" if failed else
          f"all {len(jobs)} kernels ({distinct} distinct compiles): no spills, shared memory within the H100 limit")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
