"""--report-to tensorboard,wandb: the records of metrics.jsonl reach TensorBoard's event files and an offline W&B
run, under the same names at the same steps, across a kill and a resume; a missing package or a failing reporter."""
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

import alip
import data
import eval as evaluation

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "WANDB_CONFIG_DIR": "", "WANDB_CACHE_DIR": ""}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths = data.write_demo(str(tmp_path_factory.mktemp("demo") / "demo_data"))
    return os.path.join(paths["train"], "00000.tar")


def command(shards, out, *extra):
    return [sys.executable, "alip.py", "--data", shards, "--model", "tiny", "--batch-size", "16", "--workers", "0",
            "--warmup", "2", "--log-every", "1", "--save-every", "2", "--output", str(out),
            "--report-to", "tensorboard,wandb", "--wandb-tags", "test,offline", *extra]


def metrics(out):
    return [r for r in evaluation.read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


def tensorboard_scalars(out):
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}, tags["images"]


def wandb_history(out):
    """[(step, {key: value})] of every history record in the offline W&B run folder(s) under out, in file order.
    The .wandb file is W&B's leveldb-style log: a 7-byte header, then records in 32 KiB blocks, each record a
    7-byte header (checksum, length, kind: 1 whole, 2 first, 3 middle, 4 last piece) and a protobuf."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "**", "run-*.wandb"), recursive=True)):
        raw = open(path, "rb").read()
        assert raw[:4] == b":W&B", path
        pos, pieces = 7, b""
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
            pieces = chunk if kind in (1, 2) else pieces + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pieces)
                if record.WhichOneof("record_type") == "history":
                    items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                    rows.append((record.history.step.num, items))
    return rows


def test_reporters_get_the_metrics_and_a_resume_repeats_no_step(shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(command(shards, out, "--steps", "6"), cwd=ROOT, env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "ckpt-00000004.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # after checkpoint 4, wherever the run is
    assert (out / "ckpt-00000004.pt").exists(), first.communicate()[1][-3000:]
    first.wait()
    r = subprocess.run(command(shards, out, "--steps", "6", "--resume"), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]

    scalars, images = tensorboard_scalars(out)
    for key in ("loss", "loss_raw", "loss_caption", "w_s", "w_t", "w_c", "H_tc", "H_xt", "H_xc", "logit_scale", "lr",
                "samples_per_s", "truth/lcg_auc", "truth/loss_auc"):
        assert [s for s, _ in scalars[key]] == [1, 2, 3, 4, 5, 6], (key, scalars[key])  # each step once
        for (_, got), want in zip(scalars[key], logged):
            assert got == pytest.approx(want[key], rel=1e-6), key  # TensorBoard keeps float32
    assert "curves" in images

    # The resumed run's W&B stream: every step once, with metrics.jsonl's values, also those before the checkpoint
    # that the kill took from W&B's buffer; the same W&B run id as the killed run's.
    folders = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(folders) == 2 and len({f.rsplit("-", 1)[1] for f in folders}) == 1, folders
    history = [(step, items) for step, items in wandb_history(folders[-1]) if "loss" in items]
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6], history
    for step, items in history:
        for key in ("loss", "w_s", "H_tc", "truth/lcg_auc"):
            assert items[key] == pytest.approx(logged[step - 1][key], rel=1e-12), key
    assert json.loads((out / "wandb.json").read_text())["step"] == 6  # ended cleanly at step 6


@pytest.mark.parametrize("reporter, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_one_line_before_anything_is_built(monkeypatch, reporter, package):
    for name in list(sys.modules):
        if name == package or name.startswith(package + ".") or name == "torch.utils.tensorboard":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # what `import` finds for a package that is not installed
    with pytest.raises(data.UserError, match=f"pip install {package}"):
        alip.parse_args(["--data", "shards/", "--report-to", reporter])


def test_a_failing_reporter_warns_once_and_the_run_goes_on(tmp_path, capsys):
    class Broken:
        def log(self, record):
            raise ConnectionError("the network is down")

    log = evaluation.RunLog(str(tmp_path), 0)
    log.reporters["wandb"] = Broken()
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "wandb" in warnings[0] and "network is down" in warnings[0], warnings
    assert [r["step"] for r in evaluation.read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]


def test_a_skipped_steps_warning_goes_to_metrics_jsonl_alone(tmp_path):
    """A step skipped for a non-finite loss never happened: the reporters do not see it, and the last step they had
    (W&B's floor after a resume) stays the last real one."""
    class Seen:
        def __init__(self):
            self.steps = []

        def log(self, record):
            self.steps.append(record["step"])

    log = evaluation.RunLog(str(tmp_path), 0)
    log.reporters["wandb"] = seen = Seen()
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "warning": "non-finite loss, step skipped"})
    assert seen.steps == [1] and log.step == 1
    assert [r["step"] for r in evaluation.read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]
