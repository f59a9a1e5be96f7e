"""Stage one, `python caption.py`: a tiny random BLIP captioner made here (nothing is downloaded) captions a small
shard set with broken samples. The captions are the model's own greedy ones, every usable key is written once after a
kill -9 and a rerun, two torchrun ranks write the same file as one process, and the file trains.

transformers cannot be imported into a process that has imported this repository's kernels/ (pytest has, for
tests/test_kernels.py): everything that needs it runs in processes of its own. Commands run in forks of a fork server
that has imported transformers once (see tests/forkserver.py), or as fresh processes where a test needs to kill one or
to limit its file sizes."""
import contextlib
import importlib.util
import io
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data

safetensors_torch = pytest.importorskip("safetensors.torch")  # transformers' own format; installed with it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server needs Linux"),
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="stage one needs transformers: pip install transformers")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PROMPT = "a picture of"  # BLIP's default prompt in caption.py
SIDE = 32  # the tiny captioner's input size: JPEGs decode at a reduced scale that keeps both sides >= SIDE

# A BLIP captioner with 2-layer, 32-wide towers and a vocabulary of 83 words and letters, saved as a folder; then the
# captions that its own greedy generate gives, one image at a time, for every image of the shards that the pipeline
# captions (each key once: the first shard that holds it), with the pipeline's decoding and its documented
# post-processing.
BUILD = r"""
import json, os, sys
import torch
# Before the repository joins sys.path: its kernels/ would shadow the package of that name that transformers imports.
from transformers import (AutoModelForImageTextToText, AutoProcessor, BertTokenizer, BlipConfig,
                          BlipForConditionalGeneration, BlipProcessor)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

model_dir, shards, root, side, prompt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sys.path.append(root)
import data

os.makedirs(model_dir)
words = ("a picture of the photo with red green blue cat dog on in and sky tree car man woman sitting standing "
         "small large two people grass water").split()
letters = "bcdefghijklmnopqrstuvwxyz"  # "a" is a word already
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *("##" + c for c in "a" + letters)]
with open(os.path.join(model_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab))
tokenizer = BertTokenizer(os.path.join(model_dir, "vocab.txt"))
# BLIP's initializer_range of 0.02 makes a random model blind, with one caption for every image.
tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.2)
config = BlipConfig(
    vision_config=dict(**tower, image_size=side, patch_size=8),
    text_config=dict(**tower, vocab_size=len(tokenizer), encoder_hidden_size=32, max_position_embeddings=64,
                     bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, pad_token_id=0),
    projection_dim=32)
torch.manual_seed(0)
BlipForConditionalGeneration(config).save_pretrained(model_dir)
BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": side, "width": side}),
              tokenizer=tokenizer).save_pretrained(model_dir)

processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
model = AutoModelForImageTextToText.from_pretrained(model_dir, use_kernels=False).eval()
captions = {}
for sample in data.iter_samples(data.expand_shards(shards)):
    ext = next((e for e in data.IMAGE_EXTS if e in sample), None)
    if sample["__key__"] in captions or ext is None:
        continue
    try:
        image = data.decode_image(sample[ext], side)
    except ValueError:
        continue
    with torch.inference_mode():
        ids = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=20,
                             num_beams=1, do_sample=False)
    text = " ".join(processor.decode(ids[0], skip_special_tokens=True).split())
    captions[sample["__key__"]] = text[len(prompt):].strip() if text.startswith(prompt) else text
print(json.dumps(captions))
"""


def _image(seed, fmt="JPEG", size=(96, 72)):
    # Blocks of colour: images that differ in what a 32-pixel view of them shows, as noise would not.
    blocks = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize(size, Image.BILINEAR).save(buf, fmt)
    return buf.getvalue()


def _good(key, seed, fmt="JPEG"):
    return key, {"jpg" if fmt == "JPEG" else "png": _image(seed, fmt), "txt": f"raw text {seed}".encode()}


def _write_shards(d):
    """Five shards: good JPEGs and PNGs, one of each broken kind the training loader counts, a key that an earlier
    shard holds already, a tar cut off and a file that is no tar. Returns the skip counts the pipeline must report."""
    os.makedirs(d)
    data.write_tar(os.path.join(d, "00000.tar"), [_good(f"a{i:03d}", i) for i in range(6)])
    jpg = _image(99)
    broken = [("corrupt", {"jpg": jpg[:len(jpg) // 2], "txt": b"t"}), ("zerobytes", {"jpg": b"", "txt": b"t"}),
              ("notimage", {"jpg": b"<html></html>", "txt": b"t"}), ("noimage", {"txt": b"t"})]
    good = [_good(f"b{i:03d}", 100 + i, "PNG" if i % 4 == 0 else "JPEG") for i in range(14)]
    data.write_tar(os.path.join(d, "00001.tar"), good[:3] + broken[:2] + good[3:9] + broken[2:] + good[9:])
    data.write_tar(os.path.join(d, "00002.tar"), [_good(f"c{i:03d}", 200 + i) for i in range(5)] + [_good("a000", 7)])
    cut = os.path.join(d, "00003.tar")
    data.write_tar(cut, [_good(f"d{i:03d}", 300 + i) for i in range(3)])
    with open(cut, "rb") as f:
        raw = f.read()
    with open(cut, "wb") as f:
        f.write(raw[:raw.index(b"d002.jpg") + 700])  # inside the third sample: two survive
    with open(os.path.join(d, "00004.tar"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(3000))
    return {"corrupt_image": 1, "not_an_image": 1, "empty_image": 1, "missing_image": 1, "duplicate_key": 1,
            "truncated_tar": 1, "not_a_tar": 1}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The shard set, the tiny captioner, its reference captions and the skip counts the pipeline must report."""
    d = tmp_path_factory.mktemp("caption")
    skipped = _write_shards(d / "shards")
    r = subprocess.run([sys.executable, "-c", BUILD, d / "blip", d / "shards", ROOT, str(SIDE), PROMPT], cwd=d,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(set(reference.values())) >= len(reference) // 2, f"the model must see its images: {reference}"
    empty = [k for k, c in reference.items() if not c]
    if empty:
        skipped["empty_caption"] = len(empty)
    return {"shards": str(d / "shards"), "model": str(d / "blip"), "skipped": skipped,
            "captions": {k: c for k, c in reference.items() if c}}


@pytest.fixture(scope="module")
def server():
    """tests/forkserver.py, in an interpreter that has imported transformers first (data.import_transformers)."""
    start = ("import data, runpy; data.import_transformers(); import transformers; "
             "transformers.AutoModelForImageTextToText, transformers.AutoProcessor, transformers.BlipProcessor, "
             "transformers.BlipForConditionalGeneration; runpy.run_path('tests/forkserver.py', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", start], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def _command(server, folder, name, argv, timeout=120, fsize=None):
    """(status, stdout, stderr, seconds) of `python ARGV...` in the repository root, once the command and every
    process it started have ended; its output goes to folder/name.stdout and .stderr. fsize: the largest file it may
    write, as on a full disk."""
    out, err = folder / f"{name}.stdout", folder / f"{name}.stderr"
    server.stdin.write(json.dumps({"argv": [str(a) for a in argv], "out": str(out), "err": str(err),
                                   "timeout": timeout, "fsize": fsize}) + "\n")
    server.stdin.flush()
    reply = server.stdout.readline()
    assert reply, "the fork server died"
    reply = json.loads(reply)
    assert not reply["timed_out"], f"still running after {reply['seconds']:.0f} s: {err.read_text()[-3000:]}"
    return reply["status"], out.read_text(), err.read_text(), reply["seconds"]


@pytest.fixture
def run(server, tmp_path):
    """run(*argv, timeout=, fsize=) -> (status, stdout, stderr, seconds): see _command."""
    calls = itertools.count()
    return lambda *argv, timeout=120, fsize=None: _command(server, tmp_path, f"call{next(calls)}", argv, timeout,
                                                           fsize)


def caption_argv(made, out, *extra):
    return ["caption.py", made["shards"], "--captioner", made["model"], "--out", out, "--device", "cpu", *extra]


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single(made, server, tmp_path_factory):
    """One uninterrupted run in one process, 2 loader workers: (captions file, summary)."""
    folder = tmp_path_factory.mktemp("single")
    out = folder / "caps.jsonl"
    status, stdout, stderr, _ = _command(server, folder, "single",
                                         caption_argv(made, out, "--batch-size", "4", "--workers", "2", "--json"))
    assert status == 0, stderr[-3000:]
    return out, json.loads(stdout), stderr  # --json: stdout is the JSON object alone, the summary goes to stderr


def test_captions_are_the_models_own_greedy_ones(made, single):
    out, summary, _ = single
    rows = _lines(out)
    assert [set(r) for r in rows] == [{"key", "caption"}] * len(rows)
    # every usable key once, in the order of the shards and of their samples, with the model's own caption
    assert [(r["key"], r["caption"]) for r in rows] == list(made["captions"].items())
    assert data.load_captions(out) == made["captions"]
    assert summary["captions"] == len(rows) and summary["shards"] == 5
    assert summary["settings"]["prompt"] == PROMPT and summary["settings"]["precision"] == "fp32"
    assert not os.path.exists(f"{out}.parts"), "the progress folder goes once the file is complete"


def test_bad_images_are_counted_by_reason(made, single):
    _, summary, stderr = single
    assert summary["skipped"] == made["skipped"]
    for reason, n in made["skipped"].items():
        assert f"skipped {reason}: {n}" in stderr, stderr


def test_two_ranks_write_the_same_file(made, single, run, tmp_path):
    out = tmp_path / "caps.jsonl"
    status, stdout, stderr, _ = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                    *caption_argv(made, out, "--batch-size", "3", "--workers", "1"), timeout=180)
    assert status == 0, stderr[-3000:]
    with open(out, "rb") as f, open(single[0], "rb") as g:
        assert f.read() == g.read()
    assert "rank 0 of 2" in stderr and not os.path.exists(f"{out}.parts")


def _kill_when(cmd, ready, timeout=120):
    """Start cmd, SIGKILL it and its workers as soon as ready() holds; its output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ready(), f"the run ended first: {proc.communicate()[0][-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


def _limit_file_size(limit):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_file_size


def test_kill_and_rerun_captions_every_key_once(made, single, run, tmp_path):
    os.makedirs(tmp_path / "o")
    out, parts = tmp_path / "o" / "caps.jsonl", tmp_path / "o" / "caps.jsonl.parts"
    argv = caption_argv(made, out, "--batch-size", "2", "--workers", "1")
    # Killed when shard 0 is finished and shard 1 (the largest) half captioned.
    _kill_when([sys.executable, *argv], lambda: os.path.exists(parts / "00000.done") and os.path.exists(
        parts / "00001.jsonl") and os.path.getsize(parts / "00001.jsonl") > 200)
    assert not os.path.exists(out), "the captions file exists only once it is complete"
    assert not os.path.exists(parts / "00001.done")
    # A write cut off in the middle of a line, as a lost node leaves it.
    raw = (parts / "00001.jsonl").read_bytes()
    last = raw.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    (parts / "00001.jsonl").write_bytes(raw[:len(raw) - 1 - len(last) // 2])

    status, _, stderr, _ = run(*argv, "--max-new-tokens", "5")
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "--max-new-tokens 20" in stderr, stderr

    # The rerun captions the rest; then the captions file is one byte over the file size the process may write: a
    # one-line error, no temp file, and the progress kept for the next run. (No loader workers: their batches go
    # through shared-memory files, which the limit would stop too.)
    limit = os.path.getsize(single[0]) - 1
    r = subprocess.run([sys.executable, "-B", *argv, "--workers", "0"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit_file_size(limit))
    assert r.returncode == 2 and "File too large" in r.stderr and str(out) in r.stderr, r.stderr[-3000:]
    # the progress line, then the error in one line
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert r.stderr.count("error") == 1, r.stderr
    assert os.listdir(tmp_path / "o") == ["caps.jsonl.parts"]
    kept = [p for p in parts.iterdir() if p.name != ".lock"]  # the lock file: this folder's job, held while it runs
    assert sorted(p.suffix for p in kept) == [".done"] * 5 + [".json"] + [".jsonl"] * 4
    assert max(os.path.getsize(p) for p in parts.iterdir()) < limit, "the limit must leave the progress files room"

    status, stdout, stderr, _ = run(*argv)
    assert status == 0, stderr[-3000:]
    with open(out, "rb") as f, open(single[0], "rb") as g:
        assert f.read() == g.read()  # every key once, the same captions, the same order
    assert not os.path.exists(parts)
    status, stdout, stderr, _ = run(*argv, "--json")  # complete: nothing to do, the file untouched
    assert status == 0 and "nothing to do" in stderr and json.loads(stdout)["nothing_to_do"], (stdout, stderr)
    with open(out, "rb") as f, open(single[0], "rb") as g:
        assert f.read() == g.read()


def test_a_run_continues_with_the_same_captioner_wherever_it_lies_and_no_other(made, single, run, tmp_path):
    """An unfinished run (every shard captioned, the captions file not written: the disk was full) is continued by the
    same captioner copied to another folder, and refused, in one line, for other weights or another config in the
    folder it was made with."""
    model = tmp_path / "blip"
    shutil.copytree(made["model"], model)
    first = tmp_path / "first.jsonl"
    status, _, stderr, _ = run(*caption_argv(made, first, "--captioner", model, "--workers", "0"),
                               fsize=os.path.getsize(single[0]) - 1)
    assert status == 2 and "File too large" in stderr, stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("first.jsonl.parts/*.done")) == [f"{i:05d}.done" for i in range(5)]

    def unfinished(name):
        out = tmp_path / name
        shutil.copytree(f"{first}.parts", f"{out}.parts")
        return out

    def refused(out, captioner, *names):
        status, _, stderr, _ = run(*caption_argv(made, out, "--captioner", captioner))
        assert status == 2 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr[-3000:]
        assert all(n in stderr for n in names), stderr
        assert not os.path.exists(out)

    def continued(out, captioner):
        status, _, stderr, _ = run(*caption_argv(made, out, "--captioner", captioner))
        assert status == 0, stderr[-3000:]
        with open(out, "rb") as f, open(single[0], "rb") as g:
            assert f.read() == g.read()
        return stderr

    elsewhere = tmp_path / "elsewhere" / "blip"
    shutil.copytree(model, elsewhere)
    assert "pinned" not in continued(unfinished("moved.jsonl"), elsewhere)
    # An earlier caption.py's folder pinned the captioner's path alone: continued from that path, and said so.
    earlier = unfinished("earlier.jsonl")
    settings = json.loads((tmp_path / "earlier.jsonl.parts" / "settings.json").read_text())
    for name in ("captioner_config", "captioner_weights"):
        del settings[name]
    (tmp_path / "earlier.jsonl.parts" / "settings.json").write_text(json.dumps(settings))
    shutil.copytree(f"{earlier}.parts", tmp_path / "earlier_elsewhere.jsonl.parts")
    refused(tmp_path / "earlier_elsewhere.jsonl", elsewhere, "--captioner", str(model), str(elsewhere))
    said = continued(earlier, model)
    assert "earlier caption.py" in said and "pinned from here on" in said, said

    # Other weights at the same path: one tensor changed in its last bit.
    weights = safetensors_torch.load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1).view(torch.int32)[0] ^= 1
    safetensors_torch.save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    refused(unfinished("new_weights.jsonl"), model, "other weights", str(model))
    shutil.copy(elsewhere / "model.safetensors", model / "model.safetensors")
    # Another config at the same path, its weights the same.
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["layer_norm_eps"] = 1e-6
    (model / "config.json").write_text(json.dumps(config))
    refused(unfinished("new_config.jsonl"), model, "another captioner", "model.text_config.layer_norm_eps", "1e-06")


@pytest.fixture
def no_hub(tmp_path):
    """The environment of a machine where the Hugging Face hub cannot be reached (its address: a port that refuses
    connections) and whose cache is tmp_path/hf/hub, empty; HF_HUB_OFFLINE not set."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused at once
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    yield {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}
    closed.close()


def _timed(argv, env, timeout=90):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_a_model_id_without_the_hub_fails_at_once_in_one_line(made, no_hub, tmp_path):
    r, seconds = _timed(caption_argv(made, tmp_path / "caps.jsonl", "--captioner", "org/tiny-blip"), no_hub)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert all(n in r.stderr for n in ("--captioner org/tiny-blip", str(tmp_path / "hf" / "hub"), "cannot be reached",
                                       "hf download org/tiny-blip")), r.stderr
    assert seconds < 45, f"{seconds:.0f} s"


def test_a_model_id_in_the_cache_loads_from_it_at_once_without_the_hub(made, single, no_hub, tmp_path):
    # The cache's layout, as huggingface_hub writes it: the commit that refs/main names, and its files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny-blip"
    shutil.copytree(made["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "caps.jsonl"
    r, seconds = _timed(caption_argv(made, out, "--captioner", "org/tiny-blip"), no_hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cannot be reached" in r.stderr and "org/tiny-blip loaded from the local cache" in r.stderr, r.stderr
    with open(out, "rb") as f, open(single[0], "rb") as g:
        assert f.read() == g.read()
    assert seconds < 45, f"{seconds:.0f} s"


def test_the_captions_train(made, single, run, tmp_path):
    out, _, _ = single
    loader = data.TrainLoader(made["shards"], image_size=32, batch_size=8, workers=0, captions=str(out))
    _, _, caption_ids = next(iter(loader))
    wanted = {tuple(data.tokenize(c)[0].tolist()) for c in made["captions"].values()}
    assert {tuple(row.tolist()) for row in caption_ids} <= wanted
    status, _, stderr, _ = run("alip.py", "--data", made["shards"], "--captions", out, "--model", "tiny",
                               "--batch-size", "8", "--steps", "2", "--workers", "0", "--warmup", "1",
                               "--output", tmp_path / "run")
    assert status == 0, stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert any(json.loads(line).get("step") == 2 for line in f)


def test_bench_times_the_captioner(made, run):
    status, stdout, stderr, _ = run("caption.py", "--bench", "--captioner", made["model"], "--batch-size", "2", "3",
                                    "--seconds", "0.1", "--max-new-tokens", "4", "--device", "cpu")
    assert status == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert [r["batch_size"] for r in result["results"]] == [2, 3]
    assert all(r["captions_per_s"] > 0 for r in result["results"]) and "captions/s" in stdout


def test_one_failing_rank_ends_the_run(made, single, run, tmp_path):
    """Rank 1 cannot read its first progress file (a folder stands in its place): the whole run ends, at once."""
    out, parts = tmp_path / "o" / "caps.jsonl", tmp_path / "o" / "caps.jsonl.parts"
    os.makedirs(parts / "00001.jsonl")
    settings = {**single[1]["settings"], "shards": [f"{i:05d}.tar" for i in range(5)]}
    (parts / "settings.json").write_text(json.dumps(settings))
    status, _, stderr, seconds = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     "--monitor-interval", "0.5",
                                     *caption_argv(made, out, "--batch-size", "2", "--workers", "1"), timeout=120)
    assert status != 0 and "error: cannot read" in stderr and "00001.jsonl: Is a directory" in stderr, stderr[-3000:]
    assert seconds < 60 and not os.path.exists(out)


@pytest.mark.parametrize("case", ["transformers-missing", "model-folder", "batch-size-0", "workers-negative",
                                  "shards-missing", "device-unknown", "out-a-folder"])
def test_bad_input_is_one_line_and_status_2(made, run, tmp_path, case):
    os.makedirs(tmp_path / "o")
    out = tmp_path / "o" / "caps.jsonl"
    if case == "transformers-missing":  # as if it were not installed
        hide = ("import runpy, sys; sys.modules['transformers'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path('caption.py', run_name='__main__')")
        r = subprocess.run([sys.executable, "-c", hide, *caption_argv(made, out)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
        status, stderr, names = r.returncode, r.stderr, ["pip install transformers"]
    else:
        (tmp_path / "not_a_model").mkdir()
        (tmp_path / "not_a_model" / "config.json").write_text('{"model_type": "bert"}')  # a text model, no weights
        argv, names = {
            "model-folder": (caption_argv(made, out, "--captioner", tmp_path / "not_a_model"),
                             ["--captioner", "not_a_model", "AutoProcessor"]),
            "batch-size-0": (caption_argv(made, out, "--batch-size", "0"), ["--batch-size"]),
            "workers-negative": (caption_argv(made, out, "--workers", "-1"), ["--workers"]),
            "shards-missing": (["caption.py", tmp_path / "none", "--out", out], ["none"]),
            "device-unknown": (caption_argv(made, out, "--device", "gpu7"), ["--device", "gpu7"]),
            "out-a-folder": (caption_argv(made, tmp_path / "o"), ["--out", str(tmp_path / "o"), "folder"]),
        }[case]
        status, _, stderr, _ = run(*argv)
    assert status == 2, (status, stderr[-3000:])
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and all(n in stderr for n in names), stderr
    assert os.listdir(tmp_path / "o") == [], "nothing is written"


def test_a_second_job_into_the_same_file_is_refused_naming_the_first(made, run, tmp_path):
    out = tmp_path / "caps.jsonl"
    held = data.lock_directory(str(out) + ".parts")  # as a first job, this process, holds it
    try:
        status, _, stderr, seconds = run(*caption_argv(made, out))
    finally:
        held.close()
    assert status == 2 and f"PID {os.getpid()}" in stderr and "--out" in stderr, stderr[-3000:]
    assert len(stderr.strip().splitlines()) == 1 and seconds < 30, stderr


def test_a_loader_worker_killed_by_sigkill_is_one_line(made, tmp_path):
    """What the out-of-memory killer does to a worker: one line naming it, exit status 2, the progress kept."""
    out, parts = tmp_path / "caps.jsonl", tmp_path / "caps.jsonl.parts"
    proc = subprocess.Popen([sys.executable, *caption_argv(made, out, "--batch-size", "1", "--workers", "2")],
                            cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2 and proc.poll() is None and time.time() < deadline:  # the loader has started
        time.sleep(0.01)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
    assert len(workers) == 2, (workers, proc.poll())
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith(f"error: data loader worker 0 of 2 (PID {workers[0]}) was ended by SIGKILL"), last
    assert last.endswith("then run the same command again to continue"), last
    assert os.path.exists(parts / "settings.json") and not os.path.exists(out)


def test_shards_without_one_usable_image_are_one_line_and_write_nothing(made, run, tmp_path):
    data.write_tar(str(tmp_path / "00000.tar"), [("a", {"jpg": b"", "txt": b"t"}), ("b", {"txt": b"t"})])
    out = tmp_path / "caps.jsonl"
    status, _, stderr, _ = run("caption.py", tmp_path / "00000.tar", "--captioner", made["model"], "--out", out,
                               "--device", "cpu", "--workers", "0")
    last = stderr.strip().splitlines()[-1]  # after the progress line
    assert status == 2 and last.startswith("error: not one image") and "Traceback" not in stderr, stderr[-3000:]
    assert "empty_image" in stderr and "missing_image" in stderr and not out.exists()
