"""A resumed run is the run it says it is, and a killed one continues at once: the same command given again right
after a kill -9 resumes; a loader worker that the out-of-memory killer ends is one line; a resume that would change
the run is refused, one that may change it (--lr) applies it and says so; the skip counts go on across a resume;
the unweighted loss of each path is logged beside the gate-weighted one."""
import contextlib
import io
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for a run's workers")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of 32 x 32 images in which every fifth raw text is empty: skipped (empty_text), so that the skip
    counts grow as the run goes."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for j in range(2):
        samples = []
        for i in range(j * 200, (j + 1) * 200):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            text = b"" if i % 5 == 0 else f"a picture number {i}".encode()
            samples.append((f"{i:06d}", {"png": buf.getvalue(), "txt": text, "syn.txt": f"caption {i}".encode()}))
        data.write_tar(str(d / f"{j:05d}.tar"), samples)
    return str(d)


def command(shards, out, *extra):
    return [sys.executable, "alip.py", "--data", shards, "--model", "tiny", "--batch-size", "16", "--workers", "2",
            "--warmup", "2", "--lr", "1e-3", "--log-every", "1", "--steps", "8", "--save-every", "2",
            "--output", str(out), *extra]


def start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, seconds=240):
    deadline = time.time() + seconds
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(path), proc.communicate()[1][-3000:]


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_run_killed_with_its_workers_alive_continues_at_once(shards, tmp_path):
    """kill -9 of the trainer alone, as a scheduler or a double Ctrl-C leaves its loader workers for a moment: the
    same command, given again within a second, continues from the last checkpoint."""
    proc = start(command(shards, tmp_path, "--steps", "200"))
    wait_for(tmp_path / "ckpt-00000002.pt", proc)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    again = start(command(shards, tmp_path, "--steps", "200", "--resume"))
    assert time.time() - killed < 1
    try:
        wait_for(tmp_path / "ckpt-00000004.pt", again, seconds=120)  # it trains on
    finally:
        for group in (again.pid, proc.pid):  # the first run's workers too, if they still wait
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        out, err = again.communicate()
    assert "resumed from" in out and "in use by another run" not in err, err[-3000:]


def test_a_loader_worker_killed_by_sigkill_is_one_line_and_the_run_resumes(shards, tmp_path):
    proc = start(command(shards, tmp_path, "--steps", "40"))
    wait_for(tmp_path / "ckpt-00000002.pt", proc)
    victim = children(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)  # what the out-of-memory killer does
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"error: data loader worker 1 of 2 (PID {victim}) was ended by SIGKILL, most likely "
                                "by the out-of-memory killer"), lines[-1]
    assert "lower --workers or --batch-size" in lines[-1] and "--resume" in lines[-1]
    last = alip.latest_checkpoint(str(tmp_path))
    assert 2 <= torch.load(last, weights_only=True)["step"] < 40  # intact, and the run not done
    r = subprocess.run(command(shards, tmp_path, "--steps", "40", "--resume"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert torch.load(alip.latest_checkpoint(str(tmp_path)), weights_only=True)["step"] == 40


@pytest.fixture(scope="module")
def stopped(shards, tmp_path_factory):
    """A run of 40 steps stopped by SIGTERM after its checkpoint of step 2 (it saves once more as it stops), and the
    same run uninterrupted: (the stopped run's folder, the step it stopped at, the full run's folder)."""
    full, out = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("stopped")
    r = subprocess.run(command(shards, full, "--steps", "40"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start(command(shards, out, "--steps", "40"))
    wait_for(out / "ckpt-00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    step = torch.load(alip.latest_checkpoint(str(out)), weights_only=True)["step"]
    assert step < 40, "the run must stop before its end"
    return out, step, full


@pytest.mark.parametrize("flag, value, was", [("--batch-size", "8", "16"), ("--seed", "1", "0"),
                                              ("--workers", "1", "2"), ("--gates", "none", "all"),
                                              ("--warmup", "5", "2")])
def test_a_resume_that_would_change_the_run_is_refused(shards, stopped, flag, value, was):
    out, step, _ = stopped
    before = sorted(os.listdir(out))
    r = subprocess.run(command(shards, out, "--steps", "40", "--resume", flag, value), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert f"{flag} {value} (the checkpoint's: {was})" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == before


def test_a_resume_applies_a_new_lr_says_so_and_records_it_and_the_counts_go_on(shards, stopped):
    out, step, full = stopped
    r = subprocess.run(command(shards, out, "--steps", "40", "--resume", "--lr", "5e-4"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--resume: from step {step}: --lr 0.0005 (was 0.001)" in r.stdout, r.stdout
    # The rate of each step after the resume: the new base rate on the same schedule (warmup 2, cosine to 0 at 40).
    logged = {x["step"]: x for x in records(out) if "lr" in x}
    for s in range(step + 1, 41):
        want = 5e-4 * 0.5 * (1 + math.cos(math.pi * (s - 1 - 2) / (40 - 2)))
        assert math.isclose(logged[s]["lr"], want, rel_tol=1e-6), (s, logged[s]["lr"], want)
    with open(os.path.join(out, "config.json")) as f:
        segments = json.load(f)["segments"]
    assert [(g["from_step"], g["args"]["lr"]) for g in segments] == [(0, 1e-3), (step, 5e-4)]
    # The skip counts of the first step after the resume are those of the same step of the uninterrupted run.
    def skipped_at(folder, s):
        return [x["skipped"] for x in records(folder) if "skipped" in x and x["step"] <= s][-1]
    first = step + 1
    assert skipped_at(out, first) == skipped_at(full, first), (skipped_at(out, first), skipped_at(full, first))
    assert skipped_at(out, first)["empty_text"] > 0


def test_the_unweighted_loss_of_each_path_is_logged(stopped):
    """Beside the gate-weighted loss (tests/test_alip.py checks its value)."""
    _, _, full = stopped
    logged = [x for x in records(full) if "loss" in x]
    assert all(x["loss_raw_unweighted"] > 0 and x["loss_caption_unweighted"] > 0 for x in logged)
    assert any(abs(x["loss_raw_unweighted"] - x["loss_raw"]) > 1e-3 for x in logged), "the gates weigh the loss"
