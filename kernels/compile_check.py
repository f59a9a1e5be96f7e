"""Compile every kernel variant with every config of the plan's tables, for sm_90 (H100), without a GPU.

    python -m kernels.compile_check                 # the whole matrix: D in DIMS x bf16, fp16, fp32-tf32, fp32-ieee
    python -m kernels.compile_check --dims 200,1000 # any D (the launcher pads D to a multiple of 16)
    python -m kernels.compile_check --quick         # every config once, where it is heaviest (CI)
    python -m kernels.compile_check --jobs 8        # parallel compiles (default: the CPU count)
    python -m kernels.compile_check --table         # also print the _RESOURCES table these compiles give

Triton's compiler runs the ptxas that ships in its wheel. Registers and local memory come from the cubin
(cuobjdump --dump-resource-usage), shared memory from the compiled kernel's metadata plus the cubin's static
shared memory. Local memory is where ptxas spills registers (Triton reports it as n_spills = bytes / 4). A kernel
fails if it has any, if it needs more shared memory than an H100 block may opt in to (227 KiB), or if it holds
fewer programs per SM than kernels.gated_clip_loss._RESOURCES says (the plan's waves would be too few): that
table is the most registers and shared memory of each config over the D of its width, its variants, and Triton
3.6 and 3.9, so a lighter compile may hold more. Each compile uses the specialisation that the launchers' inputs
get (16-byte aligned pointers, the padded D a multiple of 16), with M and N multiples of 16 or not: Triton
compiles the two apart, and they can differ in spills. Prints one line per kernel and exits non-zero on any
failure.
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
from kernels.bench import CommandParser

H100_SHARED = 232448  # bytes of shared memory per block with the opt-in (227 KiB)
DIMS = (16, 64, 128, 200, 256, 512, 768, 1000, 1024)
KINDS = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "fp32-tf32": (torch.float32, "tf32"),
         "fp32-ieee": (torch.float32, "ieee")}  # name -> (input dtype, tl.dot input_precision)
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# the variants the launchers run, as constexprs; weighted throughout (the weights' loads are the heavier case)
VARIANTS = {
    "fwd": {"square": dict(COL_LSE=True), "gathered": dict(COL_LSE=False)},
    "bwd": {role: dict(O_TERM=o, W_TERM=w, PARTIAL=p, HAS_WEIGHT=True) for role, (_, o, w, p) in g._ROLES.items()},
    "loss": {"square": dict(COL_LSE=True, HAS_WEIGHT=True), "gathered": dict(COL_LSE=False, HAS_WEIGHT=True)},
    "finish": {"weighted": dict(HAS_WEIGHT=True), "unweighted": dict(HAS_WEIGHT=False)},
}
KERNELS = {"fwd": "_fwd_kernel", "bwd": "_bwd_kernel", "loss": "_loss_kernel", "finish": "_finish_kernel"}
# pointers of the input dtype; every other pointer is fp32 (the gate weights too)
INPUTS = {"Q0", "K0", "Q1", "K1", "PARTNER", "O0", "W0", "O1", "W1", "PARTNER0", "PARTNER1"}
OUTPUTS = {"OUT0", "OUT1"}  # the gradients, of the input dtype, except where a variant writes fp32 partial sums
INTS = {"M", "N", "D", "DG", "MO", "MW", "n", "splits", "groups", "stats_n"}
ROWS = {"M", "N", "MO", "MW", "n"}  # multiples of 16 or not, as the job says; D and DG are
SMALL = {"loss": (g._LOSS_BLOCK, 0, g._SMALL_WARPS, 1),
         "finish": (g._FINISH_BLOCKS["BLOCK_R"], g._FINISH_BLOCKS["BLOCK_C"], g._SMALL_WARPS, 1)}


def width(D):
    """The config tables' width for the (padded) D: NC * DC, at least 256."""
    nc, dc = g._chunks(D, g._MAX_DC)
    return max(256, nc * dc)


def matrix(dims, quick):
    """(kernel, variant, kind, D, config, M and N multiples of 16) of every compile; D is the padded D."""
    jobs = []
    for kind, (dtype, precision) in KINDS.items():
        k = g._kind(dtype, precision)
        for D in sorted({g._padded_dim(d) for d in dims}):
            for kernel, table in (("fwd", g._FWD_CONFIGS), ("bwd", g._BWD_CONFIGS)):
                for variant in VARIANTS[kernel]:  # a width without configs runs another kind's (see _BWD_CONFIGS)
                    jobs += [(kernel, variant, kind, D, c) for c in table.get((k, width(D)), [])]
        for kernel, config in SMALL.items():
            jobs += [(kernel, variant, kind, max(dims), config) for variant in VARIANTS[kernel]]
    if quick:
        # every config of the tables once, where it is heaviest: the square variants at the widest D of each
        # width, bf16 for the 16-bit entries, and the small kernels in bf16; then, with M and N multiples of 16,
        # the first bf16 backward config at the widest D
        heaviest, corners = {}, []
        for kernel, variant, kind, D, c in jobs:  # in increasing D
            if kind in ("fp16", "fp32-tf32") and kernel in SMALL or kind == "fp16":
                continue
            if variant == "square" or kernel in SMALL:
                heaviest[kernel, variant, kind, width(D), c] = (kernel, variant, kind, D, c, False)
        dtype, precision = KINDS["bf16"]
        first = g._BWD_CONFIGS[g._kind(dtype, precision), width(g._padded_dim(max(dims)))][0]
        corners.append(("bwd", "rows", "bf16", g._padded_dim(max(dims)), first, True))
        return list(heaviest.values()) + corners
    return [job + (mn16,) for job in jobs for mn16 in (False, True)]


def _signature_and_meta(job):
    kernel, variant, kind, D, (bm, bn, warps, stages), mn16 = job
    dtype, precision = KINDS[kind]
    fn = getattr(g, KERNELS[kernel])
    meta = dict(VARIANTS[kernel][variant])
    nc, dc = g._chunks(D, g._MAX_DC)
    if kernel == "fwd":
        meta.update(NC=nc, DC=dc, PRECISION=precision, UPCAST=False, BLOCK_M=bm, BLOCK_N=bn)
    elif kernel == "bwd":
        meta.update(NC=nc, DC=dc, PRECISION=precision, UPCAST=False, BLOCK_O=bm, BLOCK_W=bn)
    elif kernel == "loss":
        meta.update(BLOCK_R=bm)
    else:
        meta.update(BLOCK_R=bm, BLOCK_C=bn)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name] = "constexpr"
            continue
        typed = name in INPUTS or name in OUTPUTS and not (kernel == "bwd" and meta["PARTIAL"])
        signature[name] = "i32" if name in INTS else POINTER[dtype] if typed else "*fp32"
        if signature[name][0] == "*" or name in ("D", "DG") or name in ROWS and mn16:
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
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 200,1000") from None
    if not all(1 <= d <= g.MAX_D for d in dims):
        raise argparse.ArgumentTypeError(f"{text}: every D must lie in 1..{g.MAX_D}")
    return dims


def resources(jobs, results):
    """{_RESOURCES key: (registers, shared bytes)}: the most of each over the jobs that share a key."""
    table = {}
    for job in jobs:
        kernel, variant, kind, D, config, _ = job
        dtype, precision = KINDS[kind]
        key = g._resource_key(KERNELS[kernel], g._kind(dtype, precision), width(D), config)
        regs, _, shared = results[job]
        old = table.get(key, (0, 0))
        table[key] = (max(old[0], regs), max(old[1], shared))
    return table


def main(argv=None):
    p = CommandParser(prog="python -m kernels.compile_check", description=__doc__)
    p.add_argument("--dims", type=parse_dims, default=list(DIMS), help="comma-separated feature dimensions D")
    p.add_argument("--quick", action="store_true", help="every config once where it is heaviest, and a corner")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    p.add_argument("--table", action="store_true", help="print the _RESOURCES table these compiles give")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the flag makes @triton.jit return interpreted functions, which cannot be compiled: run afresh without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        sys.exit(subprocess.run([sys.executable, "-m", "kernels.compile_check"] + argv, env=env).returncode)
    import triton

    jobs = matrix(args.dims, args.quick)
    print(f"triton {triton.__version__}, sm_90; D = {','.join(map(str, args.dims))} (padded to multiples of 16); "
          f"{len(jobs)} kernels; limits: 0 bytes of local memory, {H100_SHARED} bytes of shared memory, and at "
          f"least the programs per SM of kernels.gated_clip_loss._RESOURCES")
    print(f"{'kernel':6} {'variant':9} {'dtype':9} {'D':>5} {'BM,BN,warps,stages':19} {'M,N%16':6} "
          f"{'regs':>4} {'spill':>6} {'shared':>7} {'per SM':>6} {'table':>5}")
    results, distinct = compile_all(jobs, args.jobs)
    failed = 0
    for job in jobs:
        regs, spill, shared = results[job]
        kernel, variant, kind, D, config, mn16 = job
        dtype, precision = KINDS[kind]
        per_sm = g.programs_per_sm(regs, shared, config[2])
        tabled = g._RESOURCES.get(g._resource_key(KERNELS[kernel], g._kind(dtype, precision), width(D), config))
        table_sm = None if tabled is None else g.programs_per_sm(*tabled, config[2])
        bad = spill > 0 or shared > H100_SHARED or table_sm is None or per_sm < table_sm
        failed += bad
        print(f"{kernel:6} {variant:9} {kind:9} {D:5} {','.join(map(str, config)):19} {'yes' if mn16 else 'no':6} "
              f"{regs:4} {spill:6} {shared:7} {per_sm:6} {str(table_sm):>5}" + ("  FAIL" if bad else ""))
    if args.table:
        print("_RESOURCES = {")
        for key, value in sorted(resources(jobs, results).items(), key=repr):
            print(f"    {key!r}: {value!r},".replace("'", '"'))
        print("}")
    print(f"{failed} of {len(jobs)} kernels spill, exceed the shared memory or hold fewer programs per SM than "
          f"the table says" if failed else
          f"all {len(jobs)} kernels ({distinct} distinct compiles): no spills, shared memory within the H100 limit, "
          f"at least the programs per SM of the table")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
