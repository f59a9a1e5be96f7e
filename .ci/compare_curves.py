"""Do two training runs that differ only in --kernel (fused, reference) have the same loss curve?

    python .ci/compare_curves.py RUN_FUSED RUN_REFERENCE      # folders holding metrics.jsonl; exit 1 if not

Both runs: same seed, data, flags and --log-every 1. What "agree" means, and why these bounds:
  step 1       relative difference <= --first-tol (1e-3). Both runs start from the same weights and batch, so
               only the loss implementation differs: --kernel fused gets the features in bf16 (under bf16
               autocast) and sums in fp32, --kernel reference gets them in fp32 (tf32 GEMMs on CUDA). Rounding
               the features to bf16 moves the loss by about 1e-4 relative, the sums' rounding by about 1e-6
               (kernels/gated_clip_loss.py, "Precision").
  every step   relative difference <= --tol (2e-2). After step 1 the runs drift apart through those roundings,
               amplified by bf16 autocast and AdamW; 2% leaves room for that drift over a short run, while a
               wrong gradient (a missing term, a wrong scale) moves the curve by far more within a few steps.
  learning     in each run, the mean loss over the last quarter of the steps is at least --drop (2%) below
               the mean over the first quarter. Run with --gates none: the gated loss rises while the gates
               open in the first steps (on the demo: 0.42 at step 1, 2.5 at step 58), the plain loss falls.
"""

import argparse
import json
import math
import os
import sys


def losses(run):
    path = os.path.join(run, "metrics.jsonl")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise SystemExit(f"compare_curves: cannot read {path}: {e}")
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def problems(fused, reference, first_tol, tol, drop):
    """Every way the two curves fail to agree, as lines (none: they agree)."""
    if sorted(fused) != sorted(reference) or len(fused) < 4:
        return [f"the runs logged different or too few steps: {sorted(fused)} vs {sorted(reference)}"]
    out = []
    steps = sorted(fused)
    for step in steps:
        f, r = fused[step], reference[step]
        if not (math.isfinite(f) and math.isfinite(r)):
            out.append(f"step {step}: non-finite loss (fused {f}, reference {r})")
            continue
        bound = first_tol if step == steps[0] else tol
        if abs(f - r) > bound * abs(r):
            out.append(f"step {step}: fused {f:.6f} vs reference {r:.6f}, relative difference "
                       f"{abs(f - r) / abs(r):.2e} > {bound:g}")
    q = max(1, len(steps) // 4)
    for name, curve in (("fused", fused), ("reference", reference)):
        first = sum(curve[s] for s in steps[:q]) / q
        last = sum(curve[s] for s in steps[-q:]) / q
        if not last <= (1 - drop) * first:
            out.append(f"{name}: the loss did not fall by {drop:.0%}: mean of the first {q} steps {first:.4f}, "
                       f"of the last {q} {last:.4f}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fused", help="run folder of --kernel fused")
    p.add_argument("reference", help="run folder of --kernel reference")
    p.add_argument("--first-tol", type=float, default=1e-3, help="relative difference allowed at the first step")
    p.add_argument("--tol", type=float, default=2e-2, help="relative difference allowed at every step")
    p.add_argument("--drop", type=float, default=0.02, help="fall of the loss required of each run")
    args = p.parse_args()
    fused, reference = losses(args.fused), losses(args.reference)
    worst = max((abs(fused[s] - reference[s]) / abs(reference[s]) for s in fused if s in reference), default=math.nan)
    print(f"{len(fused)} steps; fused {fused.get(min(fused, default=0))} -> {fused.get(max(fused, default=0))}, "
          f"reference {reference.get(min(reference, default=0))} -> {reference.get(max(reference, default=0))}; "
          f"largest relative difference {worst:.2e}")
    found = problems(fused, reference, args.first_tol, args.tol, args.drop)
    for line in found:
        print("DISAGREE " + line)
    if found:
        sys.exit(1)
    print(f"agree: step 1 within {args.first_tol:g}, every step within {args.tol:g}, both fell by >= {args.drop:.0%}")


if __name__ == "__main__":
    main()
