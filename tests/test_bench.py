"""kernels.bench: a tiny run end to end (Triton interpreter on CPU, compiled on CUDA), the GEMM counts its rows
claim, its Inf-CL call, and its flag checks."""

import glob
import json
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kernels import bench
from kernels.gated_clip_loss import choose_impl, fused_available, gated_clip_loss_reference, launch_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"fp32": 1e-5, "bf16": 1e-5}  # loss vs reference: fp32 sums of the same exact products, in another order
ROW_KEYS = {"impl", "weighted", "B", "n", "D", "dtype", "status", "ms", "peak_mem_mib", "gemms", "tflops", "loss",
            "plan", "model_ms", "auto"}


@pytest.mark.skipif(not fused_available(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")
def test_tiny_run_writes_the_results(tmp_path, capsys):
    sizes = [16, 40]
    bench.main(["--sizes", ",".join(map(str, sizes)), "--dim", "32", "--dtypes", "fp32,bf16", "--device", DEVICE,
                "--rep-ms", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| fused |" in out and " bwd:" in out  # the launch plan beside the row
    (path,) = glob.glob(str(tmp_path / "*.json"))
    result = json.load(open(path))
    assert os.path.basename(path) == f"{result['slug']}-{result['date']}.json"
    assert re.fullmatch(r"[a-z0-9-]+", result["slug"]) and re.fullmatch(r"\d{4}-\d\d-\d\d", result["date"])
    for key in ("device", "torch", "triton", "commit", "date", "rows"):
        assert result[key], key
    assert result["torch"] == torch.__version__
    rows = {(r["impl"], r["weighted"], r["dtype"], r["B"]): r for r in result["rows"]}
    for dtype in ("fp32", "bf16"):
        for B in sizes:
            for impl, weighted in (("reference", True), ("fused", True), ("floor", None)):
                r = rows[impl, weighted, dtype, B]
                assert ROW_KEYS <= set(r), set(r) ^ ROW_KEYS
                assert r["status"] == "ok" and r["ms"] > 0 and r["D"] == 32 and r["n"] == B
                assert (r["peak_mem_mib"] is None) == (DEVICE == "cpu")
                assert r["auto"] == ("reference" if DEVICE == "cpu" else choose_impl(B, B, 32, bench.DTYPES[dtype][0],
                                                                                      DEVICE)[0])
                assert r["model_ms"] > 0
                if impl == "fused":
                    plan = launch_plan(B, B, 32, bench.DTYPES[dtype][0], bench.gcl._sm_count(DEVICE))
                    # 5 similarity GEMMs; tiles of 32 x 32 over B = 16 or 40 rows add their padding
                    assert r["gemms"] == round(sum(p["gemms"] for p in plan), 3) >= 5
                else:
                    assert r["gemms"] == bench.GEMMS[impl] and r["plan"] is None
            ref, fused = rows["reference", True, dtype, B]["loss"], rows["fused", True, dtype, B]["loss"]
            assert ref > 0 and abs(fused - ref) <= TOL[dtype] * ref, (dtype, B, fused, ref)
            assert rows["fused", True, dtype, B]["matches"] is True


def test_floor_runs_exactly_four_similarity_gemms_per_direction():
    B, D = 40, 24  # three chunks of 16 rows, the last one short
    x, t = torch.randn(B, D), torch.randn(B, D)
    with FlopCounterMode(display=False) as flops:
        bench.floor_fn(x, t, chunk=16)()
    assert flops.get_total_flops() == bench.GEMMS["floor"] * 2 * B * B * D == 4 * 2 * B * B * D
    x_all, t_all = torch.randn(3 * B, D), torch.randn(3 * B, D)
    with FlopCounterMode(display=False) as flops:
        bench.floor_fn(x_all[:B], t_all[:B], 16, x_all, t_all)()
    assert flops.get_total_flops() == 8 * 2 * B * (3 * B) * D


@pytest.mark.skipif(not fused_available(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")
def test_one_rank_of_several(tmp_path, capsys):
    """--ranks 4: n = B / 4 local rows against B gathered ones, whose leaves get gradients; the gathered plan
    (n = 32, B = 128: whole tiles of the interpreter's 32, so no padding in the GEMM count)."""
    bench.main(["--sizes", "128", "--ranks", "4", "--dim", "32", "--dtypes", "bf16", "--device", DEVICE,
                "--rep-ms", "0", "--no-save"])
    out = capsys.readouterr().out
    assert "one rank of 4" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 128 | 32 |")]
    gemms = {r[4].strip(): float(r[12]) for r in rows}
    assert gemms == {"reference": 6, "fused": 10, "floor": 8}, gemms
    assert all("MISMATCH" not in r[9] for r in rows)


def test_reference_runs_six_similarity_gemms():
    B, D = 40, 24
    x, t = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    with FlopCounterMode(display=False) as flops:
        gated_clip_loss_reference(x, t, s, torch.rand(B)).backward()
    assert flops.get_total_flops() == bench.GEMMS["reference"] * 2 * B * B * D


def fake_inf_cl(calls):
    """inf_cl's cal_flash_loss as its source defines it: per-sample LSE_j(s q_i.k_j) - s q_i.k_i."""
    def cal_flash_loss(q, k, labels=None, scale=None, head_dim=256):
        assert q.shape[1] % head_dim == 0
        calls.append(head_dim)
        logits = (scale * q) @ k.T
        return torch.logsumexp(logits, 1) - logits.diagonal()
    return types.SimpleNamespace(cal_flash_loss=cal_flash_loss)


def test_inf_cl_call_is_our_unweighted_symmetric_loss():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(50, 96, generator=gen, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(50, 96, generator=gen, dtype=torch.float64), dim=-1)
    s, calls = torch.tensor(30.0, dtype=torch.float64), []
    got = bench.inf_cl_loss(fake_inf_cl(calls), x, t, s)
    assert calls == [32, 32]  # two calls, one per direction; 96 = 3 heads of 32
    assert abs(got.item() - gated_clip_loss_reference(x, t, s).item()) < 1e-12


def test_inf_cl_head_dim():
    assert [bench.inf_cl_head_dim(D) for D in (512, 768, 96, 48, 100)] == [256, 256, 32, 16, None]


@pytest.mark.parametrize("argv, flag", [(["--sizes", "4096,lots"], "--sizes"), (["--sizes", "0"], "--sizes"),
                                        (["--dtypes", "fp64"], "--dtypes"), (["--max-b", "100"], "--max-b"),
                                        (["--dim", "0"], "--dim"), (["--time-budget", "0"], "--time-budget"),
                                        (["--sizes", "100", "--ranks", "8"], "--ranks")])
def test_bad_flags_give_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: python -m kernels.bench: ") and flag in err, err
    assert err.count("\n") == 1, err


def test_default_sizes_double_from_1024_to_max_b():
    assert bench.parse_args(["--max-b", "10000"]).sizes == [1024, 2048, 4096, 8192]
    assert bench.parse_args([]).sizes[-1] == 1_048_576
