"""Bad input gets one line and exit status 2; a fatal error ends every process of a run; a damaged
checkpoint never stops a resume.

Every command runs as a process of its own, forked from tests/forkserver.py, which imports torch once
and waits until the command and everything it started (loader workers, torchrun's ranks) have ended."""
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image

import alip
import caption
import kernels.bench
import kernels.compile_check
import data
import eval as evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server needs Linux")


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def run(server, tmp_path):
    """run(*argv, timeout=, env=, fsize=) -> Result, for `python ARGV...` in the repository root."""
    calls = iter(range(1000))

    def run(*argv, timeout=60, env=None, fsize=None):
        n = next(calls)
        out, err = tmp_path / f"stdout{n}", tmp_path / f"stderr{n}"
        request = {"argv": [str(a) for a in argv], "out": str(out), "err": str(err), "timeout": timeout,
                   "env": env or {}, "fsize": fsize}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        assert reply, "the fork server died"
        reply = json.loads(reply)
        return Result(reply["status"], out.read_text(), err.read_text(), reply["seconds"], reply["timed_out"])
    return run


# --- inputs: a tiny data set and files that are wrong in every way the rows below need

def _jpeg(seed, side=64):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shard(path, keys, image=_jpeg):
    data.write_tar(str(path), [(f"{k:06d}", {"jpg": image(k), "txt": f"text {k}".encode(),
                                             "syn.txt": f"caption {k}".encode()}) for k in keys])


def _bomb_png(width=12000, height=12000):
    # A 1x1 PNG whose header claims width x height: Pillow warns above 89M pixels when it opens one.
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[ihdr + 17:ihdr + 21] = __import__("zlib").crc32(bytes(raw[ihdr:ihdr + 17])).to_bytes(4, "big")
    return bytes(raw)


def _shaped_like(name):
    """A state dict with the names and shapes of open_clip's model `name`, each tensor one stored zero,
    expanded: a few kilobytes on disk, whatever the model."""
    with open(os.path.join(ROOT, "tests", "data", "openclip_keys.json")) as f:
        shapes = json.load(f)[name]
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    os.makedirs(d / "train")
    _shard(d / "train" / "00000.tar", range(48))
    _shard(d / "train" / "00001.tar", range(48, 96))
    os.makedirs(d / "no_tars")
    (d / "no_tars" / "readme.txt").write_text("no shards here")
    data.write_tar(str(d / "empty.tar"), [])
    (d / "caps_nomatch.jsonl").write_text("".join(json.dumps({"key": f"other{i}", "caption": "x"}) + "\n"
                                                  for i in range(3)))
    (d / "caps_malformed.jsonl").write_text('{"key": "000000", "caption": "a"}\n{"key": "000001", "caption": \n')
    (d / "notes.txt").write_text("not a checkpoint\n")
    torch.save(_shaped_like("ViT-B-32"), d / "b32_state_dict.pt")
    torch.save({"model": _shaped_like("ViT-B-32"), "config": asdict(alip.PRESETS["ViT-B-32"]), "step": 5},
               d / "b32_ckpt.pt")
    raw = (d / "b32_state_dict.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    no_projection = {k: v for k, v in _shaped_like("ViT-B-32").items() if k != "text_projection"}
    torch.save(no_projection, d / "b32_no_projection.pt")
    tiny = alip.create_model("tiny", quick_gelu=True)
    torch.save({"model": {k: torch.zeros(()).expand(v.shape) for k, v in tiny.state_dict().items()},
                "config": asdict(tiny.config), "step": 5}, d / "tiny_quickgelu_ckpt.pt")
    # A TorchScript archive (as OpenAI's files are) without its code: torch.jit.load fails on it.
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; OpenAI's files are still in it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), d / "torchscript.pt")
    with zipfile.ZipFile(d / "torchscript.pt") as z, zipfile.ZipFile(d / "torchscript_damaged.pt", "w") as w:
        for name in z.namelist():
            if "/code/" not in name:
                w.writestr(name, z.read(name))
    # one good shard and one whose images are all broken: under 2 ranks, one rank fails and the other waits
    os.makedirs(d / "half_bad")
    _shard(d / "half_bad" / "00000.tar", range(48))
    _shard(d / "half_bad" / "00001.tar", range(48, 96), image=lambda k: b"not an image")
    os.makedirs(d / "bomb")
    data.write_tar(str(d / "bomb" / "00000.tar"),
                   [(f"{k:06d}", {"png": _bomb_png(), "txt": b"t", "syn.txt": b"c"}) for k in range(20)]
                   + [(f"{k:06d}", {"jpg": _jpeg(k), "txt": b"t", "syn.txt": b"c"}) for k in range(20, 40)])
    # data.py make: a table without the image column, and one whose images are all missing
    (d / "make").mkdir()
    (d / "make" / "no_image_column.csv").write_text("file,text\na.jpg,hello\n")
    (d / "make" / "images_missing.csv").write_text("image,text\nimg/a.jpg,hello\nimg/b.jpg,world\n")
    # eval.py: an ImageFolder of 3 classes and a class-names file with 2
    for c in ("cat", "dog", "fox"):
        os.makedirs(d / "folder" / c)
        (d / "folder" / c / "0.jpg").write_bytes(_jpeg(len(c)))
    (d / "two_names.txt").write_text("cat\ndog\n")
    (d / "latin1_names.txt").write_bytes("café\nthé\nvin\n".encode("latin-1"))
    (d / "latin1_templates.txt").write_bytes("a photo of a {c}, à la carte.\n".encode("latin-1"))
    # eval.py retrieval: a .json that is not JSON, and JSON of another layout
    (d / "not_json.json").write_text("{images: [")
    (d / "other_layout.json").write_text(json.dumps({"images": ["000000.jpg"]}))
    # eval.py zeroshot: shards whose labels are not integers
    os.makedirs(d / "labels_not_integers")
    data.write_tar(str(d / "labels_not_integers" / "00000.tar"),
                   [(f"{k:06d}", {"jpg": _jpeg(k), "cls": b"cat"}) for k in range(3)])
    return d


TRAIN = ["alip.py", "--data", "{train}", "--model", "tiny", "--batch-size", "16", "--steps", "1", "--workers", "0",
         "--output", "{out}"]
EVAL = ["eval.py", "zeroshot", "--dataset", "{folder}", "--templates", "simple", "--workers", "0", "--device", "cpu"]
RETRIEVAL = ["eval.py", "retrieval", "--checkpoint", "{ckpt}", "--workers", "0", "--device", "cpu", "--dataset"]

# Flags that argparse refuses, checked in-process: (id, argv, the flag the one-line message must name);
# argparse lets a repeated flag override the earlier one.
FLAG_ROWS = [
    ("batch-size-0", TRAIN + ["--batch-size", "0"], "--batch-size"),
    ("batch-size-negative", TRAIN + ["--batch-size", "-4"], "--batch-size"),
    ("lr-negative", TRAIN + ["--lr", "-1"], "--lr"),
    ("lr-not-a-number", TRAIN + ["--lr", "fast"], "--lr"),
    ("steps-0", TRAIN + ["--steps", "0"], "--steps"),
    ("epochs-0", TRAIN[:7] + ["--epochs", "0", "--output", "{out}"], "--epochs"),
    ("warmup-negative", TRAIN + ["--warmup", "-1"], "--warmup"),
    ("workers-negative", TRAIN + ["--workers", "-1"], "--workers"),
    ("accum-steps-0", TRAIN + ["--accum-steps", "0"], "--accum-steps"),
    ("save-every-0", TRAIN + ["--save-every", "0"], "--save-every"),
    ("log-every-0", TRAIN + ["--log-every", "0"], "--log-every"),
    ("keep-0", TRAIN + ["--keep", "0"], "--keep"),
    ("max-bad-fraction-2", TRAIN + ["--max-bad-fraction", "2"], "--max-bad-fraction"),
    ("max-bad-steps-0", TRAIN + ["--max-bad-steps", "0"], "--max-bad-steps"),
    ("grad-clip-negative", TRAIN + ["--grad-clip", "-1"], "--grad-clip"),
    ("wd-negative", TRAIN + ["--wd", "-0.1"], "--wd"),
    ("momentum-1.5", TRAIN + ["--momentum", "1.5"], "--momentum"),
    ("train-num-samples-0", TRAIN + ["--train-num-samples", "0"], "--train-num-samples"),
    ("eval-every-negative", TRAIN + ["--eval-every", "-5"], "--eval-every"),
    ("seeds-without-demo", TRAIN + ["--seeds", "0", "1"], "--seeds"),
    ("wandb-name-without-wandb", TRAIN + ["--wandb-name", "b32"], "--wandb-name"),
    ("eval-zeroshot-missing", TRAIN + ["--eval-zeroshot", "{folder}/no/such/set"], "--eval-zeroshot"),
    ("eval-retrieval-no-shards", TRAIN + ["--eval-retrieval", "{folder}/gone/{{0..1}}.tar"], "--eval-retrieval"),
    ("make-shard-size-0", ["data.py", "make", "table.csv", "{out}", "--shard-size", "0"], "--shard-size"),
    ("eval-batch-size-0", EVAL + ["--checkpoint", "ck.pt", "--batch-size", "0"], "--batch-size"),
]
MAINS = {"alip.py": alip.parse_args, "data.py": data.main,
         "eval.py": lambda argv: evaluation.main(argv, load_model=None, presets=None)}


@pytest.mark.parametrize("row, argv, flag", FLAG_ROWS, ids=[r[0] for r in FLAG_ROWS])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, row, argv, flag):
    argv = [a.format(train=tmp_path, out=tmp_path, folder=tmp_path) for a in argv]
    with pytest.raises(data.UserError, match=re.escape(flag)) as e:
        MAINS[argv[0]](argv[1:])
    assert "\n" not in str(e.value) and os.listdir(tmp_path) == []


# Everything else runs as a command: (id, argv, what stderr must name)
ROWS = [
    ("data-missing", TRAIN + ["--data", "{inputs}/no/such/dir"], ["no/such/dir"]),
    ("data-empty-tar", TRAIN + ["--data", "{inputs}/empty.tar"], ["empty.tar"]),
    ("data-dir-without-tars", TRAIN + ["--data", "{inputs}/no_tars"], ["no_tars"]),
    ("batch-larger-than-data", TRAIN + ["--batch-size", "512"], ["--batch-size"]),
    ("captions-missing", TRAIN + ["--captions", "{inputs}/gone.jsonl"], ["gone.jsonl"]),
    ("captions-malformed", TRAIN + ["--captions", "{inputs}/caps_malformed.jsonl"], ["caps_malformed.jsonl", "line 2"]),
    ("init-missing", TRAIN + ["--init", "{inputs}/gone.pt"], ["--init", "gone.pt"]),
    ("init-text-file", TRAIN + ["--init", "{inputs}/notes.txt"], ["--init", "notes.txt"]),
    ("init-truncated", TRAIN + ["--init", "{inputs}/truncated.pt"], ["--init", "truncated.pt"]),
    ("init-other-preset", TRAIN + ["--init", "{inputs}/b32_state_dict.pt"], ["ViT-B-32", "--model"]),
    ("init-other-preset-ours", TRAIN + ["--init", "{inputs}/b32_ckpt.pt"], ["ViT-B-32", "--model"]),
    ("init-missing-a-tensor", TRAIN + ["--init", "{inputs}/b32_no_projection.pt"], ["--init", "text_projection"]),
    ("init-ours-other-activation", TRAIN + ["--init", "{inputs}/tiny_quickgelu_ckpt.pt"], ["--init", "--quick-gelu"]),
    ("init-torchscript-damaged", TRAIN + ["--init", "{inputs}/torchscript_damaged.pt"],
     ["--init", "torchscript_damaged.pt", "cannot load"]),
    ("fresh-run-over-another", TRAIN, ["--output", "ckpt-00000003.pt", "--resume"]),
    ("resume-other-preset", TRAIN + ["--resume"], ["ViT-B-32", "--model"]),
    ("resume-nothing-loads", TRAIN + ["--resume"], ["ckpt-00000002.pt"]),
    ("inspect-missing", ["data.py", "inspect", "{inputs}/no/such/dir"], ["no/such/dir"]),
    ("inspect-captions-malformed", ["data.py", "inspect", "{train}", "--captions", "{inputs}/caps_malformed.jsonl"],
     ["caps_malformed.jsonl", "line 2"]),
    ("add-captions-missing", ["data.py", "add-captions", "{train}", "{inputs}/gone.jsonl", "{out}"], ["gone.jsonl"]),
    ("make-no-image-column", ["data.py", "make", "{inputs}/make/no_image_column.csv", "{out}"],
     ["no_image_column.csv", "image"]),
    ("make-images-missing", ["data.py", "make", "{inputs}/make/images_missing.csv", "{out}"], ["img/a.jpg"]),
    ("add-captions-into-non-empty", ["data.py", "add-captions", "{train}", "{inputs}/caps_nomatch.jsonl", "{out}"],
     ["notes.md", "--overwrite"]),
    ("add-captions-overwrite-not-shards", ["data.py", "add-captions", "{train}", "{inputs}/caps_nomatch.jsonl", "{out}",
                                           "--overwrite"], ["notes.md", "more than shards"]),
    ("add-captions-into-its-input", ["data.py", "add-captions", "{train}", "{inputs}/caps_nomatch.jsonl", "{train}",
                                     "--overwrite"], ["holds the input"]),
    ("demo-over-other-files", ["data.py", "demo", "{out}"], ["not a demo dataset"]),
    ("eval-checkpoint-missing", EVAL + ["--checkpoint", "{inputs}/gone.pt"], ["gone.pt"]),
    ("eval-checkpoint-text-file", EVAL + ["--checkpoint", "{inputs}/notes.txt"], ["notes.txt"]),
    ("eval-checkpoint-truncated", EVAL + ["--checkpoint", "{inputs}/truncated.pt"], ["truncated.pt"]),
    ("eval-checkpoint-torchscript-damaged", EVAL + ["--checkpoint", "{inputs}/torchscript_damaged.pt"],
     ["torchscript_damaged.pt", "cannot load"]),
    ("eval-other-preset", EVAL + ["--checkpoint", "{inputs}/b32_state_dict.pt", "--model", "tiny"],
     ["ViT-B-32", "--model"]),
    ("eval-model-other-than-saved", EVAL + ["--checkpoint", "{ckpt}", "--model", "ViT-B-32"],
     ["--model ViT-B-32", "preset tiny", "drop it"]),
    ("eval-quick-gelu-not-saved", EVAL + ["--checkpoint", "{ckpt}", "--quick-gelu"], ["--quick-gelu", "drop it"]),
    ("eval-head-width-other-than-saved", EVAL + ["--checkpoint", "{ckpt}", "--head-width", "64"],
     ["--head-width 64", "2 vision heads of 32", "drop it"]),
    ("eval-classnames-count", EVAL + ["--checkpoint", "{ckpt}", "--classnames", "{inputs}/two_names.txt"],
     ["two_names.txt", "3"]),
    ("eval-dataset-missing", EVAL + ["--checkpoint", "{ckpt}", "--dataset", "{inputs}/no/such/dir"], ["no/such/dir"]),
    ("eval-classnames-not-utf8", EVAL + ["--checkpoint", "{ckpt}", "--classnames", "{inputs}/latin1_names.txt"],
     ["latin1_names.txt", "UTF-8"]),
    ("eval-templates-not-utf8", EVAL + ["--checkpoint", "{ckpt}", "--templates", "{inputs}/latin1_templates.txt"],
     ["latin1_templates.txt", "UTF-8"]),
    ("eval-labels-not-integers", EVAL + ["--checkpoint", "{ckpt}", "--dataset", "{inputs}/labels_not_integers",
                                         "--classnames", "{inputs}/two_names.txt"], ["no usable samples"]),
    ("retrieval-not-json", RETRIEVAL + ["{inputs}/not_json.json"], ["not_json.json", "Karpathy"]),
    ("retrieval-json-of-another-layout", RETRIEVAL + ["{inputs}/other_layout.json"], ["other_layout.json", "Karpathy"]),
    ("plot-no-metrics", ["eval.py", "plot", "{out}"], ["metrics.jsonl", "{out}"]),
    ("plot-out-under-a-file", ["eval.py", "plot", "{run}", "--out", "{inputs}/notes.txt/curves.png"],
     ["notes.txt", "not a folder"]),
    ("demo-into-a-file", ["data.py", "demo", "{inputs}/notes.txt"], ["notes.txt", "a file"]),
]


@pytest.fixture(scope="module")
def good_run(inputs, server, tmp_path_factory):
    """Three steps of `tiny` and a checkpoint after each: resumes from the first (same flags) continue the run."""
    out = tmp_path_factory.mktemp("good_run")
    argv = [a.format(train=inputs / "train", out=out) for a in TRAIN] + ["--steps", "3", "--log-every", "1",
                                                                         "--save-every", "1"]
    server.stdin.write(json.dumps({"argv": argv, "out": str(out / "stdout"), "err": str(out / "stderr"),
                                   "timeout": 120}) + "\n")
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
    assert reply["status"] == 0, (out / "stderr").read_text()[-3000:]
    for name in ("stdout", "stderr"):
        os.remove(out / name)
    return out


def _snapshot(folder):
    """{relative path: (sha1, mtime)} of every file below folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (hashlib.sha1(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return found


def _assert_one_line_error(r, names):
    assert not r.timed_out, f"still running after {r.seconds:.0f} s"
    assert r.status == 2, (r.status, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, r.stderr
    for name in names:
        assert name in r.stderr, (name, r.stderr)


@pytest.mark.parametrize("row, argv, names", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_status_2(run, inputs, good_run, tmp_path, row, argv, names):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "notes.md").write_text("the user's own file")
    if row == "fresh-run-over-another":
        shutil.copy(good_run / "ckpt-00000001.pt", out / "ckpt-00000003.pt")
        (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    if row == "resume-other-preset":
        shutil.copy(inputs / "b32_ckpt.pt", out / "ckpt-00000005.pt")
    if row == "resume-nothing-loads":
        (out / "ckpt-00000001.pt").write_bytes(b"")
        (out / "ckpt-00000002.pt").write_bytes((good_run / "ckpt-00000001.pt").read_bytes()[:1000])  # truncated
    before = _snapshot(out)
    paths = {"train": inputs / "train", "inputs": inputs, "out": out, "folder": inputs / "folder",
             "ckpt": good_run / "ckpt-00000001.pt", "run": good_run}
    r = run(*[a.format(**paths) for a in argv])
    _assert_one_line_error(r, [name.format(**paths) for name in names])
    after = _snapshot(out)
    after.pop(".lock", None)  # a training run locks --output first: its first write, and a check that it can write
    assert after == before, "the output directory changed"


def test_debug_shows_the_traceback(run, inputs, tmp_path):
    argv = [a.format(train=inputs / "train", out=tmp_path) for a in TRAIN] + ["--lr", "-1"]
    for extra, env in (["--debug"], {}), ([], {"ALIP_DEBUG": "1"}):
        r = run(*argv, *extra, env=env)
        assert r.status == 2 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_stop_on_bad_data_ends_every_process(run, inputs, tmp_path, workers):
    """No caption key matches: the loader stops the run, and the run ends, workers and all."""
    argv = [a.format(train=inputs / "train", out=tmp_path) for a in TRAIN]
    r = run(*argv, "--workers", workers, "--steps", "2", "--captions", inputs / "caps_nomatch.jsonl", timeout=60)
    _assert_one_line_error(r, ["caps_nomatch.jsonl", "--max-bad-fraction"])
    assert r.seconds < 30


def test_a_bug_in_the_trainer_keeps_its_traceback_and_ends_every_process(run, inputs, tmp_path):
    """Evaluation after step 1 fails on a damaged CIFAR file, an error no check catches, while a loader
    worker is running: a traceback and status 1, and no process left behind."""
    cifar = tmp_path / "cifar-10-batches-py"
    os.makedirs(cifar)
    (cifar / "batches.meta").write_bytes(b"not a pickle")
    argv = [a.format(train=inputs / "train", out=tmp_path / "out") for a in TRAIN]
    r = run(*argv, "--workers", "1", "--steps", "2", "--eval-every", "1", "--eval-zeroshot", cifar, timeout=60)
    assert not r.timed_out, f"still running after {r.seconds:.0f} s"
    assert r.status == 1 and "Traceback" in r.stderr, r.stderr[-3000:]
    assert r.seconds < 30


def test_one_failing_rank_ends_the_whole_run(run, inputs, tmp_path):
    """Two gloo ranks: the one reading only broken images stops; the other, waiting for it in a
    collective, must not wait forever, and torchrun reports the failure."""
    argv = [a.format(train=inputs / "half_bad", out=tmp_path) for a in TRAIN]
    r = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--monitor-interval", "0.5",
            *argv, "--workers", "1", "--steps", "2", timeout=120)
    assert not r.timed_out, f"still running after {r.seconds:.0f} s"
    assert r.status != 0
    assert "max_bad_fraction" in r.stderr or "--max-bad-fraction" in r.stderr, r.stderr[-3000:]
    assert r.seconds < 60
    # The rank left waiting in a collective says so in one line: the only traceback is torchrun's own.
    assert r.stderr.count("Traceback (most recent call last)") <= 1, r.stderr[-5000:]


def test_decompression_bomb_is_skipped_without_a_warning(run, inputs):
    """12000 x 12000 in the header: above Pillow's warning threshold, below its error threshold."""
    r = run("data.py", "inspect", inputs / "bomb", "--json")
    assert r.status == 0, r.stderr[-3000:]
    assert "DecompressionBomb" not in r.stderr + r.stdout, r.stderr
    assert json.loads(r.stdout)["skipped"] == {"image_too_large": 20}  # stdout is the JSON object alone


def test_resume_moves_bad_newer_checkpoints_aside(run, inputs, good_run, tmp_path):
    """Newer than the good checkpoint of step 1: one truncated, one of zero bytes, one of random bytes and
    one of another run's architecture. Resuming moves the four aside, byte for byte, and goes on from step 1."""
    out = tmp_path / "run"
    os.makedirs(out)
    os.link(good_run / "ckpt-00000001.pt", out / "ckpt-00000001.pt")  # only read: the run writes new files
    shutil.copy(good_run / "metrics.jsonl", out / "metrics.jsonl")
    raw = (good_run / "ckpt-00000001.pt").read_bytes()
    bad = {2: raw[:len(raw) // 3], 3: b"", 4: np.random.default_rng(0).integers(0, 256, 10 ** 5, np.uint8).tobytes()}
    for step, content in bad.items():
        (out / f"ckpt-{step:08d}.pt").write_bytes(content)
    other = torch.load(good_run / "ckpt-00000001.pt", weights_only=True)
    tiny = alip.PRESETS["tiny"]
    cfg = replace(tiny, embed_dim=2 * tiny.embed_dim)  # another architecture, whatever `tiny` is
    other["model"], other["config"], other["step"] = alip.CLIP(cfg).state_dict(), asdict(cfg), 5
    torch.save(other, out / "ckpt-00000005.pt")
    bad[5] = (out / "ckpt-00000005.pt").read_bytes()

    argv = [a.format(train=inputs / "train", out=out) for a in TRAIN]
    r = run(*argv, "--steps", "3", "--log-every", "1", "--save-every", "1", "--resume")
    assert r.status == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'ckpt-00000001.pt'} at step 1" in r.stdout, r.stdout
    for step, content in bad.items():
        name = f"ckpt-{step:08d}.pt"
        assert name in r.stderr, r.stderr
        assert (out / (name + ".bad")).read_bytes() == content, os.listdir(out)  # kept as it was
    assert "another architecture" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p for p in os.listdir(out) if p.endswith(".pt")) == [f"ckpt-0000000{i}.pt" for i in (1, 2, 3)]
    assert torch.load(out / "ckpt-00000002.pt", weights_only=True)["step"] == 2  # written by the resumed run
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3]


# --- a machine's faults: a full disk, an unwritable --output, two runs at once, a reader that goes away


def test_a_failed_checkpoint_write_is_one_line_and_resume_works_after(run, inputs, good_run, tmp_path):
    """A file-size limit fails the checkpoint's write as a full disk would: one line naming the file and the cause,
    exit status 2, no temp file left, the previous checkpoint and metrics intact; once the space is back, --resume
    goes on from the previous checkpoint."""
    out = tmp_path / "run"
    os.makedirs(out)
    shutil.copy(good_run / "ckpt-00000001.pt", out / "ckpt-00000001.pt")
    shutil.copy(good_run / "metrics.jsonl", out / "metrics.jsonl")
    before = (out / "ckpt-00000001.pt").read_bytes()
    argv = [a.format(train=inputs / "train", out=out) for a in TRAIN] + ["--steps", "3", "--log-every", "1",
                                                                         "--save-every", "1", "--resume"]
    r = run(*argv, fsize=2 ** 20)  # metrics and config fit; a checkpoint of `tiny` (tens of MB) does not
    _assert_one_line_error(r, ["ckpt-00000002.pt", "File too large"])
    assert sorted(os.listdir(out)) == [".lock", "ckpt-00000001.pt", "config.json", "metrics.jsonl"]
    assert (out / "ckpt-00000001.pt").read_bytes() == before
    r = run(*argv)
    assert r.status == 0 and f"resumed from {out / 'ckpt-00000001.pt'} at step 1" in r.stdout, r.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3]


def test_an_unwritable_output_is_refused_before_the_model_is_built(run, inputs, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    r = run(*[a.format(train=inputs / "train", out=tmp_path / "a_file" / "run") for a in TRAIN])
    _assert_one_line_error(r, ["--output", "a_file", "Not a directory"])
    assert "parameters" not in r.stdout, r.stdout  # the line that follows building the model


def test_a_second_run_into_the_same_output_is_refused_naming_the_first(run, inputs, tmp_path):
    out = tmp_path / "run"
    argv = [a.format(train=inputs / "train", out=out) for a in TRAIN] + ["--save-every", "1", "--log-every", "1"]
    first = subprocess.Popen([sys.executable, *argv, "--steps", "100000"], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "ckpt-00000001.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "ckpt-00000001.pt").exists(), first.communicate()[1][-3000:]
        for extra in ([], ["--resume"]):
            r = run(*argv, *extra)
            _assert_one_line_error(r, ["--output", f"PID {first.pid}"])
            assert r.seconds < 30
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a lost node: its lock goes with it
        first.wait()
    (out / "ckpt-00000009.pt.tmp4242").write_bytes(b"\0" * 4096)  # what a kill in the middle of a save leaves
    last = alip.latest_checkpoint(str(out))
    again = subprocess.Popen([sys.executable, *argv, "--steps", "100000", "--resume"], cwd=ROOT,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while alip.latest_checkpoint(str(out)) == last and again.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    again.send_signal(signal.SIGTERM)  # it saves and stops
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0 and "resumed from" in stdout, stderr[-3000:]
    assert not (out / "ckpt-00000009.pt.tmp4242").exists(), "the lock's holder clears a killed save's temp file"


def test_rough_edges_get_a_line(run, inputs, tmp_path):
    """A warmup longer than the run is named; the log line gives the skipped samples' reasons; --help shows the
    defaults; --init takes a run directory; a reader that goes away ends the output without a traceback."""
    out = tmp_path / "bombs"
    r = run(*[a.format(train=inputs / "bomb", out=out) for a in TRAIN], "--log-every", "1")
    assert r.status == 0, r.stderr[-3000:]
    assert "warning: --warmup 2000 is not shorter than the run (1 steps)" in r.stdout, r.stdout
    assert re.search(r"skipped \d+ \(image_too_large \d+\)", r.stdout), r.stdout
    r = run(*[a.format(train=inputs / "train", out=tmp_path / "again") for a in TRAIN], "--init", out)
    assert r.status == 0 and f"initialised from {out}" in r.stdout, r.stderr[-3000:]
    r = run("alip.py", "--help")
    assert r.status == 0 and all(re.search(r"\(default:\s+" + v, r.stdout) for v in ("0.001", "runs/alip")), r.stdout
    reader_gone = subprocess.Popen([sys.executable, "data.py", "inspect", str(inputs / "train")], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader_gone.stdout.close()
    err = reader_gone.communicate(timeout=60)[1].decode()
    assert "Traceback" not in err and "Exception ignored" not in err, err


HELPS = [(alip.parse_args, []), (alip.parse_args, ["--demo"]), (caption.parse_args, []), (kernels.bench.parse_args, []),
         (kernels.compile_check.main, []),
         *((data.main, [cmd]) for cmd in ("demo", "inspect", "make", "add-captions", "bench")),
         *((lambda argv: evaluation.main(argv, load_model=None, presets=None), [cmd])
           for cmd in ("zeroshot", "retrieval", "linear-probe", "plot", "export"))]


@pytest.mark.parametrize("parse, argv", HELPS, ids=[" ".join(["?", *a]) for _, a in HELPS])
def test_every_help_shows_every_default(capsys, parse, argv):
    """Every flag and optional argument of every command says its default in its --help text."""
    with pytest.raises(SystemExit):
        parse([*argv, "--help"])
    text = capsys.readouterr().out
    # The flags' entries: from a line that starts with a flag or an argument name to the next such line.
    usage, entries = text.split("\n\n")[0], re.split(r"\n(?=  \S)", text.split("\noptions:\n", 1)[1])
    positionals = re.split(r"\n(?=  \S)", text.split("\npositional arguments:\n", 1)[-1].split("\noptions:\n")[0])
    # with a default: optional positionals, "[shards]" in the usage line (but not "runs [runs ...]")
    entries += [e for e in positionals if re.search(rf"(^|\s)\[{e.split()[0]}\]", usage)]
    missing = [e.split()[0] for e in entries
               if not ("(default" in e or "(required)" in e or e.strip().startswith("-h, --help"))]
    assert entries and not missing, f"no default shown for {missing}"
