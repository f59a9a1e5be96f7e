"""data.py: transforms, shard expansion, broken data, splitting, exact resume, commands, demo set."""
import collections
import contextlib
import errno
import io
import json
import math
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data


# --- helpers: tiny shards built in a temp dir

def _jpeg(seed, size=(40, 32)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000):
    # A real 1x1 PNG whose header claims a huge size: dangerous only if decoded, tiny on disk.
    raw = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


def _good(i, caption=True):
    files = {"jpg": _jpeg(i), "txt": f"sample {i}".encode()}
    if caption:
        files["syn.txt"] = f"caption {i}".encode()
    return f"{i:06d}", files


def _shards(tmp, n_shards, per_shard, caption=True):
    os.makedirs(tmp, exist_ok=True)
    for j in range(n_shards):
        data.write_tar(os.path.join(tmp, f"{j:05d}.tar"),
                       [_good(j * per_shard + i, caption) for i in range(per_shard)])
    return str(tmp)


def _broken_set(tmp):
    """Two good shards (100 samples) plus one sample or shard of every broken kind; returns the spec
    and the expected skip counts."""
    os.makedirs(tmp)
    for j in range(2):
        data.write_tar(os.path.join(tmp, f"good{j}.tar"), [_good(j * 50 + i) for i in range(50)])
    jpg = _jpeg(7)
    bad = [
        ("corrupt", {"jpg": jpg[:len(jpg) // 2], "txt": b"t", "syn.txt": b"c"}),
        ("notimage", {"jpg": b"<html>not an image</html>", "txt": b"t", "syn.txt": b"c"}),
        ("zeroimage", {"jpg": b"", "txt": b"t", "syn.txt": b"c"}),
        ("noimage", {"txt": b"t", "syn.txt": b"c"}),
        ("notext", {"jpg": jpg, "syn.txt": b"c"}),
        ("zerotext", {"jpg": jpg, "txt": b"", "syn.txt": b"c"}),
        ("nocaption", {"jpg": jpg, "txt": b"t"}),
        ("latin1", {"jpg": jpg, "txt": "café".encode("latin-1"), "syn.txt": b"c"}),
        ("bomb", {"png": _bomb_png(), "txt": b"t", "syn.txt": b"c"}),
    ]
    data.write_tar(os.path.join(tmp, "bad.tar"), bad)
    # A tar cut off inside its third sample: the first two survive.
    cut = os.path.join(tmp, "cut.tar")
    data.write_tar(cut, [_good(1000 + i) for i in range(3)])
    with open(cut, "rb") as f:
        raw = f.read()
    third = raw.index(b"001002.jpg")  # the third sample's first header
    with open(cut, "wb") as f:
        f.write(raw[:third + 700])
    with open(os.path.join(tmp, "notatar.tar"), "wb") as f:
        f.write(os.urandom(3000))
    open(os.path.join(tmp, "empty.tar"), "wb").close()
    spec = str(tmp) + "::" + os.path.join(str(tmp), "missing.tar")
    expected = {"corrupt_image": 1, "not_an_image": 1, "empty_image": 1, "missing_image": 1, "missing_text": 1,
                "empty_text": 1, "missing_caption": 1, "bad_utf8_text": 1, "image_too_large": 1,
                "truncated_tar": 1, "not_a_tar": 1, "empty_shard": 1, "unreadable_shard": 1}
    return spec, expected


def _text_rows(batches):
    return [tuple(row.tolist()) for _, text, _ in batches for row in text]


# --- transforms

# OpenAI CLIP's normalisation (its preprocessing in clip/clip.py), the numbers the transforms must use.
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def test_train_transform_shape_range_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    def t(img, g):
        return data.normalize(data.random_crop_flip(img, g, 32))
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(1))
    c = t(img, torch.Generator().manual_seed(2))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = (0 - CLIP_MEAN) / CLIP_STD, (1 - CLIP_MEAN) / CLIP_STD
    assert (a >= lo.view(3, 1, 1) - 1e-5).all() and (a <= hi.view(3, 1, 1) + 1e-5).all()


def test_train_transform_flat_colour_and_flip_rate():
    def t(img, g):
        return data.normalize(data.random_crop_flip(img, g, 16))
    flat = t(Image.new("RGB", (40, 30), (200, 100, 50)), torch.Generator().manual_seed(0))
    want = (torch.tensor([200, 100, 50]) / 255 - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(flat, want.view(3, 1, 1).expand(3, 16, 16))
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 255  # dark left, bright right: a flip makes the left bright
    img = Image.fromarray(half)
    flipped = sum(t(img, torch.Generator().manual_seed(s))[0, :, 0].mean() > 0 for s in range(200))
    assert 70 < flipped < 130


def test_crop_params_follow_torchvision_rules():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, w, h = data.crop_params(120, 90, g)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 90
        assert 0.7 - 0.03 <= w * h / (120 * 90) <= 1.0 + 1e-9
        assert 0.8 - 0.03 <= w / h <= 1.25 + 0.03
    # A strip no crop fits: centre crop clamped to the largest allowed aspect.
    assert data.crop_params(1000, 10, g) == ((1000 - 12) // 2, 0, 12, 10)


def test_draft_keeps_crops_at_least_target():
    for size in (64, 224):
        m = data.train_min_side(size)
        g = torch.Generator().manual_seed(size)
        for w, h in ((m, m), (m, 2 * m), (3 * m, m)):
            assert all(min(data.crop_params(w, h, g)[2:]) >= size for _ in range(300))
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    assert data.decode_image(buf.getvalue(), 100).size == (200, 150)  # 600 // 100 = 6 -> DCT scale 1/4
    assert data.decode_image(buf.getvalue()).size == (800, 600)


def test_eval_transform_centre_crop():
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:48] = (0, 255, 0)
    arr[:, 48:] = (0, 0, 255)
    x = data.eval_transform(16)(Image.fromarray(arr))
    assert x.shape == (3, 16, 16)
    # Independent reference: bicubic to 32x16, keep columns 8..24, normalise by hand.
    ref = np.asarray(Image.fromarray(arr).resize((32, 16), Image.BICUBIC))[:, 8:24].astype(np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - CLIP_MEAN.view(3, 1, 1)) / CLIP_STD.view(3, 1, 1)
    torch.testing.assert_close(x, ref)
    green = (1 - CLIP_MEAN[1].item()) / CLIP_STD[1].item()
    assert abs(x[1, :, 4:12].mean().item() - green) < 1e-3  # the middle is pure green


# --- shard specs

def test_expand_shards(tmp_path):
    for name in ("a.tar", "b.tar", "c.tar", "x.txt"):
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    abc = [os.path.join(d, n) for n in ("a.tar", "b.tar", "c.tar")]
    assert data.expand_shards(d) == abc
    assert data.expand_shards(os.path.join(d, "*.tar")) == abc
    assert data.expand_shards(os.path.join(d, "{a,c}.tar")) == [abc[0], abc[2]]
    assert data.expand_shards(os.path.join(d, "s{08..11}.tar")) == [os.path.join(d, f"s{i:02d}.tar") for i in (8, 9, 10, 11)]
    assert data.expand_shards(f"{abc[0]}::{d}/{{b,c}}.tar") == abc
    assert data.expand_shards([abc[1], abc[2]]) == abc[1:]
    assert data.expand_shards("p/{0..1}_{a,b}.tar") == ["p/0_a.tar", "p/0_b.tar", "p/1_a.tar", "p/1_b.tar"]


def test_shard_sizes_sources(tmp_path):
    d = _shards(tmp_path / "s", 2, 3)
    shards = data.expand_shards(d)
    assert data.shard_sizes(shards) == {shards[0]: 3, shards[1]: 3}  # counted, then cached
    assert sorted(os.listdir(os.path.join(d, ".alip_index"))) == ["00000.tar.npz", "00001.tar.npz"]
    with open(os.path.join(d, "00000_stats.json"), "w") as f:
        json.dump({"successes": 7}, f)  # img2dataset's per-shard stats win over counting
    assert data.shard_sizes(shards)[shards[0]] == 7
    with open(os.path.join(d, "sizes.json"), "w") as f:
        json.dump({"00000.tar": 5, "00001.tar": 4}, f)
    assert data.shard_sizes(shards) == {shards[0]: 5, shards[1]: 4}


# --- broken data

def test_every_broken_kind_is_counted(tmp_path):
    spec, expected = _broken_set(tmp_path / "d")
    r = data.inspect(spec)
    assert r["skipped"] == expected
    assert r["usable"] == 100 + 2
    assert r["samples"] == 100 + 9 + 2


def test_broken_data_still_trains(tmp_path):
    spec, expected = _broken_set(tmp_path / "d")
    loader = data.TrainLoader(spec, image_size=16, batch_size=8, workers=0)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == (100 + 9 + 3) // 8
    assert all(x.shape == (8, 3, 16, 16) and t.shape == c.shape == (8, 77) for x, t, c in batches)
    assert set(loader.skipped) <= set(expected)
    for reason in ("truncated_tar", "not_a_tar", "empty_shard", "unreadable_shard"):
        assert loader.skipped[reason] >= 1, reason  # each whole-shard failure is met in the first pass


def test_too_many_bad_samples_raise_naming_the_shard(tmp_path):
    d = tmp_path / "d"
    _shards(d, 1, 20)
    data.write_tar(str(d / "mostly_bad.tar"),
                   [(f"b{i:04d}", {"jpg": b"not a jpeg", "txt": b"t", "syn.txt": b"c"}) for i in range(80)])
    loader = data.TrainLoader(str(d), image_size=16, batch_size=4, workers=0)
    with pytest.raises(data.UserError, match=r"max-bad-fraction.*mostly_bad\.tar"):
        list(loader)
    # A whole shard that sizes.json promised 1000 samples for, gone: that is most of the data.
    os.remove(d / "mostly_bad.tar")
    (d / "sizes.json").write_text(json.dumps({"00000.tar": 20, "lost.tar": 1000}))
    loader = data.TrainLoader(f"{d}/{{00000,lost}}.tar", image_size=16, batch_size=4, workers=0)
    with pytest.raises(data.UserError, match=r"lost\.tar \(unreadable_shard\)"):
        list(loader)


# --- captions

def test_captions_side_file_and_missing_modes(tmp_path):
    d = _shards(tmp_path / "s", 1, 10, caption=False)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"key": f"{i:06d}", "caption": f"side caption {i}"}) + "\n"
                            for i in range(0, 10, 2)))
    r = data.inspect(d, captions=str(caps))
    assert r["usable"] == 5 and r["skipped"] == {"missing_caption": 5}
    assert data.inspect(d)["skipped"] == {"missing_caption": 10}
    assert data.inspect(d, missing_caption="raw")["usable"] == 10
    stats = collections.Counter()
    samples = {s["__key__"]: s for s in data.iter_samples(data.expand_shards(d))}
    assert data.parse_sample(samples["000003"], stats, missing_caption="raw")[2] == "sample 3"
    assert data.parse_sample(samples["000004"], stats, data.load_captions(str(caps)))[1:] == ("sample 4", "side caption 4")
    loader = data.TrainLoader(d, image_size=16, batch_size=5, workers=0, captions=str(caps))
    batches = list(loader)
    assert len(batches) == 2  # 10 samples counted, 5 usable: the second batch is a reshuffled pass
    for _, _, caption in batches:  # each pass yields each usable sample once
        assert sorted(map(tuple, caption.tolist())) == sorted(map(tuple, data.tokenize(
            [f"side caption {i}" for i in range(0, 10, 2)]).tolist()))
    # Counted as read: a pass stops at the last sample it needs, so not every miss is reached.
    assert set(loader.skipped) == {"missing_caption"} and 1 <= loader.skipped["missing_caption"] <= 10


# --- order, splitting, resumption

def test_two_ranks_two_workers_see_each_sample_once(tmp_path):
    d = _shards(tmp_path / "s", 8, 12)
    rows = []
    for rank in range(2):
        loader = data.TrainLoader(d, image_size=16, batch_size=4, rank=rank, world_size=2, workers=2, seed=3)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == 12
        rows += _text_rows(batches)
    want = data.tokenize([f"sample {i}" for i in range(96)])
    assert sorted(rows) == sorted(map(tuple, want.tolist()))


def test_fewer_shards_than_slots_split_by_sample(tmp_path, capsys):
    d = _shards(tmp_path / "s", 1, 16)
    rows = []
    for rank in range(2):
        loader = data.TrainLoader(d, image_size=16, batch_size=4, rank=rank, world_size=2, workers=0)
        rows += _text_rows(list(loader))
    assert "warning" in capsys.readouterr().out
    assert len(rows) == len(set(rows)) == 16


def test_uneven_ranks_give_equal_steps_and_epochs_differ(tmp_path):
    d = tmp_path / "s"
    os.makedirs(d)
    for j, n in enumerate((5, 7, 30)):
        data.write_tar(str(d / f"{j}.tar"), [_good(100 * j + i) for i in range(n)])
    for rank in range(2):
        loader = data.TrainLoader(str(d), image_size=16, batch_size=4, rank=rank, world_size=2, workers=0)
        assert loader.steps_per_epoch == 42 // 8
        e0 = _text_rows(list(loader))
        e1 = _text_rows(list(loader))  # a finished epoch moves the loader on to the next
        assert len(e0) == len(e1) == 5 * 4 and e0 != e1
    resampled = data.TrainLoader(str(d), image_size=16, batch_size=4, workers=0, resampled=True, num_samples=40)
    assert len(list(resampled)) == 10


@pytest.mark.parametrize("workers,k", [(0, 4), (2, 5)])
def test_exact_resume(tmp_path, workers, k):
    d = _shards(tmp_path / "s", 4, 12)
    data.write_tar(str(tmp_path / "s" / "00004.tar"),
                   [_good(500), ("bad", {"jpg": b"junk", "txt": b"t", "syn.txt": b"c"}), _good(501)])
    kw = dict(image_size=16, batch_size=4, workers=workers, seed=5)
    full = data.TrainLoader(d, **kw)
    full.load_state_dict({"epoch": 2, "batch": 0})
    want = list(full)
    first = data.TrainLoader(d, **kw)
    first.load_state_dict({"epoch": 2, "batch": 0})
    got = []
    for i, batch in enumerate(first):
        got.append(batch)
        if i + 1 == k:
            break
    sd = first.state_dict()
    assert (sd["epoch"], sd["batch"]) == (2, k)
    resumed = data.TrainLoader(d, **kw)
    resumed.load_state_dict(json.loads(json.dumps(sd)))  # must survive a checkpoint round trip
    got += list(resumed)
    assert len(got) == len(want) == full.steps_per_epoch
    for i, (a, b) in enumerate(zip(got, want)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"batch {i} differs"
    assert resumed.skipped == full.skipped
    assert resumed.state_dict()["epoch"] == 3


# --- leaving a loader mid-epoch

EXIT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import data
loader = data.TrainLoader({spec!r}, image_size=16, batch_size=4, workers={workers})
{body}
"""
KEPT_AT_MODULE_LEVEL = "it = iter(loader)\nnext(it)\n"
KEPT_BY_A_TRACEBACK = "def train():\n    it = iter(loader)\n    next(it)\n    raise RuntimeError('stopped')\ntrain()\n"


def test_a_script_that_leaves_a_loader_mid_epoch_exits_at_once(tmp_path):
    """The iterator is still referenced when the script ends, by a global or by the traceback the interpreter
    keeps; the workers ignore SIGTERM. Each script must end, workers and all, within the deadline."""
    spec = _shards(tmp_path / "s", 4, 12)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = {f"workers={w}, kept at module level": (w, KEPT_AT_MODULE_LEVEL, 0) for w in (0, 1, 2)}
    cases["workers=2, kept by a traceback"] = (2, KEPT_BY_A_TRACEBACK, 1)
    procs = {}
    for name, (workers, body, _) in cases.items():
        script = EXIT_SCRIPT.format(root=root, spec=spec, workers=workers, body=body)
        procs[name] = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, hung = time.monotonic() + 30, []
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            hung.append(f"{name}: still running")
        with contextlib.suppress(ProcessLookupError):  # no process left in the script's group: all ended
            os.killpg(proc.pid, signal.SIGKILL)
            hung.append(f"{name}: a process of it was left running")
    assert not hung, hung
    for name, proc in procs.items():
        stderr = proc.stderr.read().decode()
        assert proc.returncode == cases[name][2], (name, stderr[-2000:])
        assert cases[name][2] == 0 or stderr.rstrip().endswith("RuntimeError: stopped"), (name, stderr[-2000:])


# --- commands

def test_inspect_json_cli(tmp_path, capsys):
    spec, expected = _broken_set(tmp_path / "d")
    data.main(["inspect", spec, "--json"])
    last = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    assert last["usable"] == 102 and last["skipped"] == expected


def test_make_and_add_captions_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    os.makedirs(src / "img")
    rows = []
    for i in range(5):
        name = f"img/{i}.png" if i % 2 else f"img/{i}.jpg"
        raw = _png(np.full((8, 8, 3), 40 * i, np.uint8)) if i % 2 else _jpeg(i)
        (src / name).write_bytes(raw)
        rows.append({"image": name, "text": f"text {i}", "caption": f"cap {i}" if i < 2 else ""})
    rows.append({"image": "img/gone.jpg", "text": "lost", "caption": ""})
    (src / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data.main(["make", str(src), str(tmp_path / "out"), "--shard-size", "2"])
    made = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made == {"samples": 5, "shards": 3, "missing_image_files": 1}
    assert data.inspect(str(tmp_path / "out"))["usable"] == 2  # only rows 0 and 1 had captions
    samples = list(data.iter_samples(data.expand_shards(str(tmp_path / "out"))))
    assert samples[3]["png"] == (src / "img/3.png").read_bytes() and samples[3]["txt"] == b"text 3"

    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"key": s["__key__"], "caption": f"new {s['__key__']}"}) + "\n"
                            for s in samples[1:]))
    data.main(["add-captions", str(tmp_path / "out"), str(caps), str(tmp_path / "out2")])
    added = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert added["with_caption"] == 5 and added["shards"] == 3
    again = list(data.iter_samples(data.expand_shards(str(tmp_path / "out2"))))
    assert [s["__key__"] for s in again] == [s["__key__"] for s in samples]
    assert again[0]["syn.txt"] == b"cap 0"  # kept: no side caption for it
    assert again[4]["syn.txt"] == f"new {samples[4]['__key__']}".encode() and again[4]["jpg"] == samples[4]["jpg"]
    assert data.inspect(str(tmp_path / "out2"))["usable"] == 5


def _table(src, n, seed):
    """A folder with n images and meta.jsonl naming them; returns the table's path."""
    os.makedirs(src / "img")
    for i in range(n):
        (src / "img" / f"{i}.jpg").write_bytes(_jpeg(seed + i))
    (src / "meta.jsonl").write_text("".join(json.dumps({"image": f"img/{i}.jpg", "text": f"text {seed + i}",
                                                        "caption": "c"}) + "\n" for i in range(n)))
    return str(src / "meta.jsonl")


def _folder(path):
    """{name: bytes} of the files in a folder."""
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _texts(folder):
    return sorted(s["txt"].decode() for s in data.iter_samples(data.expand_shards(str(folder))))


def test_make_replaces_a_data_directory_only_as_a_whole(tmp_path, monkeypatch):
    old_table, new_table = _table(tmp_path / "old", 5, 100), _table(tmp_path / "new", 2, 200)
    out = tmp_path / "out"
    data.main(["make", old_table, str(out), "--shard-size", "2"])  # 3 shards
    before = _folder(out)
    with pytest.raises(data.UserError, match="is not empty.*--overwrite"):
        data.main(["make", new_table, str(out)])
    assert _folder(out) == before
    # A write that fails half-way (the disk fills at the second file): one line, and the old shards stay whole.
    fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(data.UserError, match="No space left on device; free some space"):
        data.main(["make", new_table, str(out), "--shard-size", "1", "--overwrite"])
    monkeypatch.setattr(os, "fsync", fsync)
    assert _folder(out) == before and sorted(os.listdir(tmp_path)) == ["new", "old", "out"]
    # Stopped half-way (Ctrl-C): the same.
    write_tar = data.write_tar

    def interrupted(path, samples):  # at the second shard
        if not path.endswith("00000.tar"):
            raise KeyboardInterrupt
        write_tar(path, samples)
    monkeypatch.setattr(data, "write_tar", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.make_shards(new_table, str(out), shard_size=1, overwrite=True)
    monkeypatch.setattr(data, "write_tar", write_tar)
    assert _folder(out) == before and sorted(os.listdir(tmp_path)) == ["new", "old", "out"]
    # Complete: the new shards replace the old ones, none of which is left.
    data.main(["make", new_table, str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == ["00000.tar", "sizes.json"] and _texts(out) == ["text 200", "text 201"]
    assert sorted(os.listdir(tmp_path)) == ["new", "old", "out"]


def test_a_killed_write_is_cleared_and_the_new_folder_is_readable_by_others(tmp_path, monkeypatch):
    """What a process killed half-way left beside OUT (its temp folder, named with this host and its PID, which runs
    no more) is removed by the next write; a new data set gets the permissions a new folder gets, not a temp folder's
    owner-only ones; a mount point is refused, since the data are written beside it and renamed into place."""
    table, out = _table(tmp_path / "src", 2, 100), tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = tmp_path / f".out.tmp.{socket.gethostname()}.{gone.pid}"
    os.makedirs(left)
    (left / "00000.tar").write_bytes(b"half a shard")
    mask = os.umask(0o022)
    try:
        data.main(["make", table, str(out)])
    finally:
        os.umask(mask)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"] and _texts(out) == ["text 100", "text 101"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    monkeypatch.setattr(os.path, "ismount", lambda path: path == str(tmp_path / "mnt"))
    with pytest.raises(data.UserError, match="mnt is a mount point"):
        data.make_shards(table, str(tmp_path / "mnt"))


def test_atomic_write_names_a_failed_write_and_passes_other_errors_on(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):  # the block's own error (reading its input), not a failed write
        with data.atomic_write(str(path)) as f:
            f.write(b"new")
            open(tmp_path / "missing")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    e = data.write_error(str(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "--out")
    assert str(e) == f"--out: cannot write {path}: No space left on device; free some space"


def test_overwrite_replaces_nothing_but_shards(tmp_path):
    table = _table(tmp_path / "src", 2, 300)
    with pytest.raises(data.UserError, match="holds the input .*meta.jsonl"):  # the table's own folder
        data.make_shards(table, str(tmp_path / "src"), overwrite=True)
    with_folder, with_notes = tmp_path / "with_folder", tmp_path / "with_notes"
    os.makedirs(with_folder / "img")
    os.makedirs(with_notes)
    (with_notes / "notes.txt").write_text("mine")
    for folder, extra in ((with_folder, "img"), (with_notes, "notes.txt")):
        (folder / "00000.tar").write_bytes(b"")
        with pytest.raises(data.UserError, match=f"holds more than shards \\(e.g. '{extra}'\\)"):
            data.make_shards(table, str(folder), overwrite=True)
        assert sorted(os.listdir(folder)) == ["00000.tar", extra]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(data.UserError, match="is a file"):
        data.make_shards(table, str(tmp_path / "a_file"), overwrite=True)


def test_add_captions_never_replaces_its_input(tmp_path):
    d = _shards(tmp_path / "s", 2, 3, caption=False)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"key": f"{i:06d}", "caption": f"new {i}"}) + "\n" for i in range(6)))
    before = _folder(tmp_path / "s")
    for spec in (d, os.path.join(d, "00001.tar")):
        with pytest.raises(data.UserError, match="holds the input"):
            data.main(["add-captions", spec, str(caps), d, "--overwrite"])
    assert _folder(tmp_path / "s") == before
    other = _shards(tmp_path / "other", 1, 2)
    data.write_tar(os.path.join(other, "00000.tar.gz"), [_good(9)])  # a second shard named 00000
    with pytest.raises(data.UserError, match="would both be copied to 00000.tar"):
        data.add_captions(f"{d}::{other}", str(caps), str(tmp_path / "out"))
    data.add_captions(d, str(caps), str(tmp_path / "out"))
    with pytest.raises(data.UserError, match="--overwrite"):
        data.add_captions(os.path.join(d, "00000.tar"), str(caps), str(tmp_path / "out"))
    data.add_captions(os.path.join(d, "00000.tar"), str(caps), str(tmp_path / "out"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["00000.tar", "sizes.json"]  # 00001.tar went with the rest
    assert data.inspect(str(tmp_path / "out"))["usable"] == 3


# What a spreadsheet saves ("CSV UTF-8" in Excel: a byte-order mark, CRLF, quotes around fields that hold the
# separator, a quote or a line break) and a Windows editor saves (the mark and CRLF).
BOM = "\ufeff"
TABLE_TEXTS = [("a cat, on a mat", "said \"hi\"; twice"), ("two\nlines", "")]
SPREADSHEET_TABLES = {
    "comma CSV": ("meta.csv", BOM + 'image,text,caption\r\nimg/0.jpg,"a cat, on a mat","said ""hi""; twice"\r\n'
                  'img/1.png,"two\nlines",\r\n'),
    "semicolon CSV": ("meta.csv", BOM + 'image;text;caption\r\nimg/0.jpg;a cat, on a mat;"said ""hi""; twice"\r\n'
                      'img/1.png;"two\nlines";\r\n'),
    "JSONL": ("meta.jsonl", BOM + "".join(json.dumps({"image": f"img/{i}.{'png' if i else 'jpg'}", "text": t,
                                                      "caption": c}) + "\r\n" for i, (t, c) in enumerate(TABLE_TEXTS))),
}


@pytest.mark.parametrize("kind", list(SPREADSHEET_TABLES))
def test_make_reads_tables_as_spreadsheets_and_windows_editors_save_them(tmp_path, kind):
    name, text = SPREADSHEET_TABLES[kind]
    os.makedirs(tmp_path / "src" / "img")
    images = [_jpeg(31), _png(np.random.default_rng(32).integers(0, 256, (6, 9, 3), dtype=np.uint8))]
    for i, raw in enumerate(images):
        (tmp_path / "src" / "img" / f"{i}.{'png' if i else 'jpg'}").write_bytes(raw)
    (tmp_path / "src" / name).write_bytes(text.encode("utf-8"))
    assert data.make_shards(str(tmp_path / "src" / name), str(tmp_path / "out"))["samples"] == 2
    samples = list(data.iter_samples(data.expand_shards(str(tmp_path / "out"))))
    assert [s.get("jpg", s.get("png")) for s in samples] == images
    assert [(s["txt"].decode(), s.get("syn.txt", b"").decode()) for s in samples] == TABLE_TEXTS


def test_caption_files_with_a_byte_order_mark_and_crlf(tmp_path):
    d = _shards(tmp_path / "s", 1, 6, caption=False)
    caps = tmp_path / "caps.jsonl"
    lines = [json.dumps({"key": f"{i:06d}", "caption": f"side caption {i}"}) for i in range(4)]
    caps.write_bytes((BOM + "\r\n".join(lines[:2]) + "\r\n" + BOM + "\r\n".join(lines[2:]) + "\r\n").encode())
    assert data.load_captions(str(caps)) == {f"{i:06d}": f"side caption {i}" for i in range(4)}
    assert data.inspect(d, captions=str(caps))["usable"] == 4  # inspect --captions, training's --captions
    data.add_captions(d, str(caps), str(tmp_path / "out"))
    assert data.inspect(str(tmp_path / "out"))["usable"] == 4


def test_table_messages_show_invisible_characters(tmp_path):
    zero_width = tmp_path / "zero_width.csv"
    zero_width.write_text("\u200bimage,text\nimg/0.jpg,hello\n", encoding="utf-8")
    with pytest.raises(data.UserError, match=re.escape("['\\u200bimage', 'text']")):
        data.make_shards(str(zero_width), str(tmp_path / "out"))
    short = tmp_path / "short.csv"
    short.write_text("text,image\r\nhello,img/0.jpg\r\nno image here\r\n", encoding="utf-8")
    with pytest.raises(data.UserError, match="short.csv, line 3: no image path"):
        data.make_shards(str(short), str(tmp_path / "out"))
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes("image,text\ncafé.jpg,x\n".encode("latin-1"))
    with pytest.raises(data.UserError, match="latin1.csv: not UTF-8 text"):
        data.make_shards(str(not_utf8), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_bench_counts_what_it_decodes(tmp_path):
    """The benchmark's bookkeeping: the images it read, their size, and the figures derived from its rates."""
    r = data.bench(_shards(tmp_path / "s", 2, 8), image_size=16, workers=0, batch_size=4, seconds=0.05)
    assert r["images"] == 16 and r["mean_pixels"] == 40 * 32 and r["image_size"] == 16
    assert r["speedup"] == r["ours_per_core"] / r["baseline_per_core"]
    assert r["workers_for_4000_per_s"] == math.ceil(4000 / r["loader_images_per_s"])  # 0 workers: one process
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("baseline_per_core", "ours_per_core", "loader_images_per_s"))


# --- demo dataset

def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


def test_write_demo_small_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEMO_TRAIN", 64)
    monkeypatch.setattr(data, "DEMO_TEST", 20)
    a = data.write_demo(str(tmp_path / "a"), seed=0)
    data.write_demo(str(tmp_path / "b"), seed=0)
    data.write_demo(str(tmp_path / "c"), seed=1)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")
    mtime = os.path.getmtime(os.path.join(a["train"], "00000.tar"))
    assert data.write_demo(str(tmp_path / "a"), seed=0) == a  # complete: reused, not rewritten
    assert os.path.getmtime(os.path.join(a["train"], "00000.tar")) == mtime
    os.makedirs(tmp_path / "user")
    (tmp_path / "user" / "precious.txt").write_text("x")
    with pytest.raises(data.UserError, match="not a demo dataset"):
        data.write_demo(str(tmp_path / "user"))
    assert os.listdir(tmp_path / "user") == ["precious.txt"]


def _named_colours(text):
    return {c for c in data.COLOURS if c in text.lower()}


def _image_colours(raw):
    """The two palette colours covering the most saturated pixels (the background is gray)."""
    px = np.asarray(data.decode_image(raw), np.float32).reshape(-1, 3)
    px = px[px.max(1) - px.min(1) > 60]
    palette = np.array(list(data.COLOURS.values()), np.float32)
    counts = np.bincount(((px[:, None] - palette[None]) ** 2).sum(-1).argmin(1), minlength=len(palette))
    return {list(data.COLOURS)[i] for i in np.argsort(counts)[-2:]}


def test_write_demo_full_spec(tmp_path):
    paths = data.write_demo(str(tmp_path / "demo"))
    train, test = data.inspect(paths["train"], previews=0), data.inspect(paths["test"], previews=0)
    assert len(data.expand_shards(paths["train"])) == 8
    assert train["usable"] == 8192 and train["skipped"] == {}
    assert test["samples"] == 1000
    with open(os.path.join(paths["test"], "classnames.txt")) as f:
        names = f.read().split("\n")[:-1]
    assert names[0] == "red and green" and names[14] == "purple and orange" and len(names) == 15
    # Test labels agree with the pixels and with the caption.
    labels = collections.Counter()
    for i, s in enumerate(data.iter_samples(data.expand_shards(paths["test"]))):
        label = int(s["cls"])
        labels[label] += 1
        assert _named_colours(names[label]) == _named_colours(s["txt"].decode())
        if i < 100:
            assert _image_colours(s["png"]) == _named_colours(names[label])
    assert len(labels) == 15
    # The truth each training sample records, re-derived from its image and texts.
    truths = collections.Counter()
    for i, s in enumerate(data.iter_samples(data.expand_shards(paths["train"])[:1])):
        truth = json.loads(s["json"])
        truths[truth["raw_text"]] += 1
        truths["caption " + truth["caption"]] += 1
        if i < 300:
            image, raw, caption = _image_colours(s["jpg"]), _named_colours(s["txt"].decode()), _named_colours(s["syn.txt"].decode())
            assert truth["raw_text"] == ("right" if raw == image else "other_image" if len(raw) == 2 else "irrelevant"), s
            assert len(raw) in (0, 2) and len(caption) == 2
            assert truth["caption"] == ("right" if caption == image else "wrong"), s
    n = sum(truths[k] for k in data.TRUTH_RAW_TEXT)
    assert n == 1024
    for key, share in (("right", data.RAW_RIGHT), ("other_image", data.RAW_OTHER),
                       ("irrelevant", 1 - data.RAW_RIGHT - data.RAW_OTHER), ("caption wrong", data.CAPTION_WRONG)):
        assert abs(truths[key] / n - share) < 0.05, (key, truths)
    # The loader passes the truth on as codes, when asked.
    loader = data.TrainLoader(paths["train"], image_size=32, batch_size=16, workers=0, truth=True)
    batch = next(iter(loader))
    assert len(batch) == 4 and batch[3].shape == (16, 2) and batch[3].dtype == torch.long
    assert batch[3][:, 0].min() >= 0 and batch[3][:, 0].max() <= 2 and set(batch[3][:, 1].tolist()) <= {0, 1}
    assert len(next(iter(data.TrainLoader(paths["train"], image_size=32, batch_size=16, workers=0)))) == 3


def test_truth_codes_from_metadata():
    assert data.parse_truth({"json": b'{"raw_text": "irrelevant", "caption": "wrong"}'}) == [2, 1]
    # img2dataset's own metadata, none at all, or something unreadable: unknown (-1).
    assert data.parse_truth({"json": b'{"url": "http://x", "status": "success"}'}) == [-1, -1]
    assert data.parse_truth({}) == [-1, -1]
    assert data.parse_truth({"json": b"not json"}) == data.parse_truth({"json": b"[1, 2]"}) == [-1, -1]
    assert data.parse_truth({"json": b'{"raw_text": "other_image", "caption": "maybe"}'}) == [1, -1]


# --- data mean what they say: empty captions, keys, coverage

def _side_file(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps({"key": k, "caption": c}) + "\n" for k, c in rows))
    return str(path)


def test_an_empty_caption_is_skipped_and_counted_from_a_file_as_from_a_shard(tmp_path):
    d = _shards(tmp_path / "s", 1, 6, caption=False)
    blank = {"jpg": _jpeg(9), "txt": b"t", "syn.txt": " \u3000\n".encode()}  # an ideographic space too
    data.write_tar(os.path.join(d, "00001.tar"), [("blank", blank)])
    caps = _side_file(tmp_path / "caps.jsonl", [("000000", "a caption"), ("000001", ""), ("000002", " \t "),
                                                 *((f"{i:06d}", f"caption {i}") for i in range(3, 6))])
    from_file = data.inspect(os.path.join(d, "00000.tar"), captions=caps)
    assert from_file["usable"] == 4 and from_file["skipped"] == {"empty_caption": 2}, from_file
    from_shard = data.inspect(os.path.join(d, "00001.tar"))  # unicode blanks in a shard's .syn.txt
    assert from_shard["usable"] == 0 and from_shard["skipped"] == {"empty_caption": 1}, from_shard
    # with --missing-caption raw, a sample without a caption trains on its raw text, from either place
    loader = data.TrainLoader(os.path.join(d, "00000.tar"), image_size=16, batch_size=6, workers=0, captions=caps,
                              missing_caption="raw")
    _, _, caption = next(iter(loader))
    want = ["a caption", "sample 1", "sample 2", *(f"caption {i}" for i in range(3, 6))]
    assert sorted(caption.tolist()) == sorted(data.tokenize(want).tolist())


def _keyed(key, seed):
    return key, {"jpg": _jpeg(seed), "txt": f"text of {key} {seed}".encode(), "syn.txt": f"cap {seed}".encode()}


def test_a_key_held_twice_is_skipped_and_counted_in_a_shard_and_across_shards(tmp_path):
    """Samples after the first with a key: adjacent in a shard (once merged into one sample), further on in it, or in
    a later shard. inspect, the training loader and the key index count them alike."""
    d = tmp_path / "s"
    os.makedirs(d)
    data.write_tar(str(d / "00000.tar"), [_keyed("a", 0), _keyed("a", 1), _keyed("b", 2), _keyed("c", 3),
                                          _keyed("b", 4), _keyed("d", 5)])
    data.write_tar(str(d / "00001.tar"), [_keyed("e", 6), _keyed("c", 7), _keyed("f", 8), _keyed("g", 9)])
    r = data.inspect(str(d))
    assert r["samples"] == 10 and r["usable"] == 7 and r["skipped"] == {"duplicate_key": 3}, r
    loader = data.TrainLoader(str(d), image_size=16, batch_size=7, workers=0)
    assert loader.num_samples == 10 and loader.coverage["duplicates"] == 3
    _, text, _ = next(iter(loader))
    got = sorted(data.tokenize([f"text of {k} {s}" for k, s in
                                (("a", 0), ("b", 2), ("c", 3), ("d", 5), ("e", 6), ("f", 8), ("g", 9))]).tolist())
    assert sorted(text.tolist()) == got, "each key's first sample, and only it"
    assert "3 have the key of an earlier sample" in loader.caption_report()


def test_a_shard_listed_twice_is_refused(tmp_path):
    d = _shards(tmp_path / "s", 2, 3)
    with pytest.raises(data.UserError, match="lists the shard .*00000.tar twice"):
        data.find_shards(f"{d}::{d}/00000.tar")
    with pytest.raises(data.UserError, match="lists the shard .*00001.tar twice"):
        data.find_shards([f"{d}/00001.tar"] * 2)


def test_the_run_says_how_many_samples_found_a_caption_and_which_wins(tmp_path):
    d = _shards(tmp_path / "s", 2, 5)  # every sample has its own .syn.txt
    elsewhere = _side_file(tmp_path / "other.jsonl", [(f"x{i}", "x") for i in range(10)])
    loader = data.TrainLoader(d, image_size=16, batch_size=5, workers=0, captions=elsewhere, missing_caption="raw")
    line = loader.caption_report()
    assert line.startswith("warning: captions: 0 of 10 samples (0%)") and "raw text as caption" in line, line
    assert "replaces the shards' own .syn.txt (held by 10)" in line, line
    ours = _side_file(tmp_path / "ours.jsonl", [(f"{i:06d}", f"file caption {i}") for i in range(9)])
    loader = data.TrainLoader(d, image_size=16, batch_size=9, workers=0, captions=ours)
    line = loader.caption_report()
    assert line.startswith("captions: 9 of 10 samples (90%) have one in") and "are skipped" in line, line
    _, _, caption = next(iter(loader))
    assert sorted(caption.tolist()) == sorted(data.tokenize([f"file caption {i}" for i in range(9)]).tolist())
    line = data.TrainLoader(d, image_size=16, batch_size=5, workers=0).caption_report()
    assert line.startswith("captions: 10 of 10 samples (100%) have one as {key}.syn.txt in the shards"), line


def test_a_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    def refuse(f, how):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(data.fcntl, "lockf", refuse)
    held = [data.lock_directory(str(tmp_path / "out"), "--output") for _ in range(2)]
    err = capsys.readouterr().err
    assert err.count("warning: --output") == 1 and "does not lock files" in err, err
    assert all(not f.closed for f in held) and "PID" in (tmp_path / "out" / ".lock").read_text()
