"""Compile every kernel variant with every config the autotuner keeps, for sm_90 (H100), without a GPU.

    python -m kernels.compile_check               # the whole matrix: D = 64 .. 1024 x bf16, fp16, fp32-tf32, fp32-ieee
    python -m kernels.compile_check --quick       # every config once, D = 1024 and fp32-ieee corners (CI)
    python -m kernels.compile_check --jobs 8      # parallel compiles (default: the CPU count)

Triton's compiler runs the ptxas that ships in its wheel. Registers and local memory come from the cubin
(cuobjdump --dump-resource-usage), shared memory from the compiled kernel's metadata plus the cubin's static
shared memory. Local memory is where ptxas spills registers (Triton reports it as n_spills = bytes / 4); a config
fails if it has any, or if it needs more shared memory than an H100 block may opt in to (227 KiB). Each compile
uses the specialisation that aligned inputs get (16-byte aligned pointers, D a multiple of 16), with M and N
multiples of 16 or not: Triton compiles the two apart, and they can differ in spills. Prints one line per
kernel and exits non-zero on any failure.
"""

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import torch

H100_SHARED = 232448  # bytes of shared memory per block with the opt-in (227 KiB)
DIMS = (64, 128, 256, 512, 768, 1024)
KINDS = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "fp32-tf32": (torch.float32, "tf32"),
         "fp32-ieee": (torch.float32, "ieee")}  # name -> (input dtype, tl.dot input_precision)
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# the backward variants the autograd function launches: (Q_TERM, K_TERM, HAS_DIAG)
BWD_VARIANTS = {"dx,dt square": (True, True, True), "dx,dt gathered": (True, False, True),
                "dx_all,dt_all": (False, True, False)}
INPUTS = {"Q", "K", "DIAG", "G"}  # pointers of the input dtype; every other pointer is fp32


def _module():
    return importlib.import_module("kernels.gated_clip_loss")  # the package exports the function by that name


def matrix(quick):
    """(kernel, variant, kind, D, config, M and N multiples of 16) of every compile."""
    g = _module()
    jobs = []
    for kind, (dtype, precision) in KINDS.items():
        k = g._kind(dtype, precision)
        for D in DIMS:
            for col in (True, False):
                for c in g._FWD_CONFIGS[k]:
                    jobs.append(("fwd", "column LSE" if col else "row LSE", kind, D, c, (k,)))
            for variant in BWD_VARIANTS:
                for c in g._BWD_CONFIGS[k, g._block_d(k, D)]:
                    jobs.append(("bwd", variant, kind, D, c, (k, g._block_d(k, D))))
    if quick:
        # every entry of the config tables once, where it is heaviest (the forward with column LSE, the square
        # backward, at the largest D that uses the entry, which is 1024 for the widest slice; bf16 for the 16-bit
        # entries); then, with M and N multiples of 16, fp16 at D = 1024 and the other fp32-ieee variants
        heaviest, corners = {}, []
        for job in jobs:  # in increasing D
            kernel, variant, kind, D, c, entry = job
            if variant in ("column LSE", "dx,dt square") and kind != "fp16":
                heaviest[kernel, entry, c] = job[:5] + (False,)
            elif D == 1024 and (kind == "fp16" and variant in ("column LSE", "dx,dt square") or kind == "fp32-ieee"):
                corners.append(job[:5] + (True,))
        return list(heaviest.values()) + corners
    return [job[:5] + (mn16,) for job in jobs for mn16 in (False, True)]


def _signature_and_meta(job):
    g = _module()
    kernel, variant, kind, D, (bm, bn, bk, warps, stages), mn16 = job
    dtype, precision = KINDS[kind]
    if kernel == "fwd":
        fn = g._lse_fwd_kernel
        meta = g._fwd_constexprs(D, precision, variant == "column LSE")
    else:
        fn = g._bwd_kernel
        meta = g._bwd_constexprs(D, precision, g._block_d(g._kind(dtype, precision), D), *BWD_VARIANTS[variant])
    meta.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name] = "constexpr"
            continue
        signature[name] = "i32" if name in ("M", "N", "D") else POINTER[dtype] if name in INPUTS else "*fp32"
        if signature[name][0] == "*" or name == "D" and D % 16 == 0 or name in ("M", "N") and mn16:
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every config once, plus the D = 1024 and fp32-ieee corners")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the flag makes @triton.jit return interpreted functions, which cannot be compiled: run afresh without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        sys.exit(subprocess.run([sys.executable, "-m", "kernels.compile_check"] + sys.argv[1:], env=env).returncode)
    import triton

    jobs = matrix(args.quick)
    print(f"triton {triton.__version__}, sm_90; {len(jobs)} kernels; limits: 0 bytes of local memory, "
          f"{H100_SHARED} bytes of shared memory")
    print(f"{'kernel':6} {'variant':15} {'dtype':9} {'D':>5} {'BM,BN,BK,warps,stages':22} {'M,N%16':6} "
          f"{'regs':>4} {'spill':>6} {'shared':>7}")
    # D enters a compile only through EVEN_K, EVEN_D and BLOCK_D: jobs that compile the same code share a result
    key = {job: repr(_signature_and_meta(job)[1:]) for job in jobs}
    unique = {}
    for job in jobs:
        unique.setdefault(key[job], job)
    results = {}
    # spawn: the workers import triton afresh rather than inherit a forked copy of this process's threads
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_one, job): k for k, job in unique.items()}
        for i, done in enumerate(concurrent.futures.as_completed(futures)):
            results[futures[done]] = done.result()
            print(f"compiled {i + 1}/{len(unique)}", file=sys.stderr, flush=True)
    failed = 0
    for job in jobs:
        regs, spill, shared = results[key[job]]
        bad = spill > 0 or shared > H100_SHARED
        failed += bad
        kernel, variant, kind, D, config, mn16 = job
        print(f"{kernel:6} {variant:15} {kind:9} {D:5} {','.join(map(str, config)):22} {'yes' if mn16 else 'no':6} "
              f"{regs:4} {spill:6} {shared:7}" + ("  FAIL" if bad else ""))
    print(f"{failed} of {len(jobs)} kernels spill or exceed the shared memory" if failed else
          f"all {len(jobs)} kernels ({len(unique)} distinct compiles): no spills, shared memory within the H100 limit")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
