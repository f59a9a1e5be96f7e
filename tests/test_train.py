"""End to end on the CPU: training lowers the loss, a killed run resumes bit for bit, bad steps are caught."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import alip
import data
import eval as evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths = data.write_demo(str(tmp_path_factory.mktemp("demo") / "demo_data"))
    return os.path.join(paths["train"], "{00000..00001}.tar")  # 4096 samples are plenty here


def command(shards, out, *extra, nproc=1):
    args = ["alip.py", "--data", shards, "--model", "tiny", "--batch-size", "16", "--workers", "1",
            "--warmup", "2", "--lr", "1e-3", "--log-every", "1", "--output", str(out), *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run(cmd, env=None):
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_training_lowers_the_loss(shards, tmp_path):
    # Without gates the objective is two plain InfoNCE terms, so its value is comparable across steps.
    r = run(command(shards, tmp_path, "--steps", "40", "--gates", "none", "--lr", "2e-3"))
    assert r.returncode == 0, r.stderr[-3000:]
    curve = losses(tmp_path)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < first - 0.3, curve
    ckpt = torch.load(alip.latest_checkpoint(str(tmp_path)), weights_only=True)
    assert ckpt["step"] == 40 and set(ckpt) >= {"model", "optimizer", "scheduler", "gates", "data", "rng", "config"}
    model = alip.load_model(str(tmp_path))  # a run directory loads as a model
    assert model.config == alip.PRESETS["tiny"]
    # The demo data record their truth: each log line carries the detectors' figures; the curves are drawn.
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if "loss" in r]
    assert all(0 <= r["truth/loss_auc"] <= 1 and r["truth/w_s_clean"] == 1.0 for r in logged)  # gates off: w_s = 1
    assert_loss_panel_falls(os.path.join(tmp_path, "curves.png"), logged)


def assert_loss_panel_falls(png, records):
    """curves.png has a panel for each group of keys the records hold, and the first, the loss, shows the raw-text
    path's line (its colour) ending lower than it starts."""
    panels = [title for title, keys in evaluation.PANELS if any(k in r for r in records for k, _ in keys)]
    cols = min(4, len(panels))
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (math.ceil(len(panels) / cols) * evaluation.PANEL[1] + evaluation.LEGEND,
                             cols * evaluation.PANEL[0]), (img.shape, panels)
    l, r, t, b = evaluation.plot_area(0, cols)
    ys, xs = np.nonzero((img[t:b, l:r] == evaluation.COLOURS[0]).all(-1))
    assert xs.size > 100, "no loss line in the loss panel"
    span = xs.max() - xs.min()
    start, end = ys[xs < xs.min() + span / 5].mean(), ys[xs > xs.max() - span / 5].mean()
    assert end > start + 5, (start, end)  # rows grow downwards: a falling loss ends further down


def kill_after(cmd, out, step, sig):
    """Start a run, wait until it has written checkpoint `step`, then send it `sig`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = os.path.join(out, f"ckpt-{step:08d}.pt")
    deadline = time.time() + 240
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(target), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, sig)
    return proc, proc.communicate()[0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_reproduces_the_run(shards, tmp_path, nproc):
    steps = ["--steps", "8", "--save-every", "3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run(command(shards, full, *steps, nproc=nproc))
    assert r.returncode == 0, r.stderr[-3000:]
    kill_after(command(shards, killed, *steps, nproc=nproc), killed, 3, signal.SIGKILL)
    r = run(command(shards, killed, *steps, "--resume", nproc=nproc))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 9)), "metrics.jsonl must hold each step once after a resume"
    assert [a[s] for s in range(4, 9)] == [b[s] for s in range(4, 9)], (a, b)


def test_sigterm_saves_and_exits_cleanly(shards, tmp_path):
    proc, output = kill_after(command(shards, tmp_path, "--steps", "200", "--save-every", "2"), tmp_path, 2,
                              signal.SIGTERM)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by signal" in output
    step = torch.load(alip.latest_checkpoint(str(tmp_path)), weights_only=True)["step"]
    assert 2 <= step < 200 and max(losses(tmp_path)) == step


def test_non_finite_steps_are_skipped_then_stop(shards, tmp_path):
    # An absurd learning rate makes the weights overflow after the first update.
    r = run(command(shards, tmp_path, "--steps", "30", "--save-every", "1", "--lr", "1e30", "--warmup", "1",
                    "--max-bad-steps", "3"))
    assert r.returncode != 0
    assert "non-finite" in r.stdout + r.stderr and "last good checkpoint" in r.stderr
    ckpt = torch.load(alip.latest_checkpoint(str(tmp_path)), weights_only=True)  # intact and loadable
    assert ckpt["step"] >= 1


def test_fused_kernel_trains_like_the_reference(shards, tmp_path):
    """The same run with the Triton loss (interpreted on the CPU) and with the PyTorch reference."""
    curves = {}
    for kernel in ("fused", "reference"):
        r = run(command(shards, tmp_path / kernel, "--steps", "4", "--kernel", kernel),
                env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("kernel fused: asked for (Triton interpreter)" if kernel == "fused" else "kernel reference (PyTorch")\
            in r.stdout, r.stdout
        curves[kernel] = losses(tmp_path / kernel)
    for step in range(1, 5):
        assert abs(curves["fused"][step] - curves["reference"][step]) < 1e-4, curves


def test_accumulation_trains_like_the_larger_batch(shards, tmp_path):
    """Two micro-batches of 8 with cached features take the same steps as one batch of 16."""
    curves = []
    for flags in (["--batch-size", "16"], ["--batch-size", "8", "--accum-steps", "2"]):
        out = tmp_path / flags[-1]
        r = run(command(shards, out, "--steps", "3", *flags))
        assert r.returncode == 0, r.stderr[-3000:]
        curves.append(losses(out))
    for step in (1, 2, 3):
        assert abs(curves[0][step] - curves[1][step]) < 1e-4, curves
