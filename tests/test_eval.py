"""eval.py: metrics (ties, < 5 classes, several captions per image), every dataset layout end to end,
the linear probe, the CLI and its error messages.

Most end-to-end tests use a "colour oracle" instead of a trained CLIP: its image feature is the mean
normalized pixel, and its text feature the sum of the image features of the colour words in the text.
A solid-colour image and a text naming its colour then get cosine 1, so the expected metrics are known
exactly and any slip in reading, labelling, batching or ranking shows. The real tiny model from alip.py
runs through the same paths in the CLI tests.
"""
import io
import json
import math
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20), "pink": (240, 150, 190)}
NAMES = list(COLOURS)


class ColourOracle(torch.nn.Module):
    def __init__(self, image_size=16):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, context_length=77)
        transform = data.eval_transform(image_size)
        table = torch.zeros(49408, 3)
        for name, rgb in COLOURS.items():
            token = data.tokenize([name])[0, 1]  # after the start token; each colour is one BPE token
            table[token] = transform(Image.new("RGB", (5, 5), rgb)).mean((1, 2))
        self.words = torch.nn.Embedding.from_pretrained(table)
        self.modes = []  # model.training seen by every encode_image call

    def encode_image(self, images):
        self.modes.append(self.training)
        return images.float().mean((2, 3))  # (B, 3)

    def encode_text(self, tokens):
        return self.words(tokens).sum(1)  # (B, 3)


def solid(name, size=(20, 14)):
    return Image.new("RGB", size, COLOURS[name])


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, samples, per_shard=3):
    """samples: list of {ext: bytes}; written as folder/shard-00000.tar, ..."""
    os.makedirs(folder, exist_ok=True)
    for n, start in enumerate(range(0, len(samples), per_shard)):
        with tarfile.open(os.path.join(folder, f"shard-{n:05d}.tar"), "w") as tar:
            for i, sample in enumerate(samples[start:start + per_shard], start):
                for ext, raw in sample.items():
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    return folder


def write_cifar(folder, per_class=2, cifar100=False):
    """A CIFAR-10 (or -100) python directory as the official tarball unpacks: Python 2 pickles of dicts
    with bytes keys, numpy arrays referenced as numpy.core (pre-numpy-2)."""
    os.makedirs(folder)

    def dump(name, obj):
        raw = pickle.dumps(obj, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)

    labels = [label for label in range(len(NAMES)) for _ in range(per_class)]
    rows = np.stack([np.asarray(solid(NAMES[label], (32, 32))).transpose(2, 0, 1).reshape(-1) for label in labels])
    if cifar100:  # CIFAR-100 names have underscores ("aquarium_fish"); eval reads them with spaces
        dump("meta", {b"fine_label_names": [f"light_{n}".encode() for n in NAMES], b"coarse_label_names": [b"x"]})
        for name in ("train", "test"):
            dump(name, {b"fine_labels": labels, b"coarse_labels": [0] * len(labels), b"data": rows})
        return folder
    dump("batches.meta", {b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        dump(name, {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                    b"filenames": [b"x.png"] * len(labels)})
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Every tensor here is tiny: on a shared 2-core machine a second thread only spins (5x slower probe).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle():
    return ColourOracle()


# -----------------------------------------------------------------------------
# classification metrics


def test_classification_metrics_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # label 1: top-1
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],   # label 1: rank 5 -> misses top-5
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 2: rank 3 -> top-5 only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])  # label 0: top-1
    m = ev.classification_metrics(logits, torch.tensor([1, 1, 2, 0]))
    assert m["acc1"] == pytest.approx(0.5)
    assert m["acc5"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 0 + 1) / 3)  # classes 3-5 absent: left out


def test_classification_ties_go_to_the_lower_index():
    tied = torch.zeros(7, 7)
    m = ev.classification_metrics(tied, torch.arange(7))  # a stable sort ranks class c at position c
    assert m["acc1"] == pytest.approx(1 / 7) and m["acc5"] == pytest.approx(5 / 7)
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    assert ev.classification_metrics(logits, torch.tensor([0]))["acc1"] == 1.0
    assert ev.classification_metrics(logits, torch.tensor([1]))["acc1"] == 0.0


def test_classification_matches_a_stable_sort_on_heavily_tied_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (300, 9), generator=g).float()
    labels = torch.randint(0, 9, (300,), generator=g)
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    rank = (order == labels[:, None]).float().argmax(1)
    m = ev.classification_metrics(logits, labels)
    assert m["acc1"] == pytest.approx((rank < 1).float().mean().item())
    assert m["acc5"] == pytest.approx((rank < 5).float().mean().item())
    recalls = [(rank[labels == c] == 0).float().mean().item() for c in range(9) if (labels == c).any()]
    assert m["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls))


def test_classification_few_classes_imbalance_and_nan():
    m = ev.classification_metrics(torch.tensor([[2.0, 1.0]] * 4), torch.tensor([0, 0, 0, 1]))
    assert m["acc1"] == 0.75 and m["mean_per_class_recall"] == 0.5 and math.isnan(m["acc5"])
    # A row of NaNs (a diverged model) is a miss, never a hit.
    m = ev.classification_metrics(torch.tensor([[math.nan, 0.0], [1.0, 0.0]]), torch.tensor([0, 0]))
    assert m["acc1"] == 0.5
    with pytest.raises(ValueError, match="labels span"):
        ev.classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


# -----------------------------------------------------------------------------
# retrieval metrics


def _reference_recalls(x, t, text_to_image, ks):
    """Straight from the definition with a stable sort over the full score matrix."""
    scores = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    i2t = torch.sort(scores, dim=1, descending=True, stable=True).indices
    t2i = torch.sort(scores.T, dim=1, descending=True, stable=True).indices
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = np.mean([any(text_to_image[j] == i for j in i2t[i, :k].tolist())
                                               for i in range(len(x))])
        out[f"text_to_image_R@{k}"] = np.mean([text_to_image[j] in t2i[j, :k].tolist() for j in range(len(t))])
    return out


def test_retrieval_by_hand_with_several_captions():
    x = torch.eye(3)  # images 0, 1, 2
    t = torch.tensor([[0.0, 1, 0],   # caption of image 0, but points at image 1
                      [1.0, 0, 0],   # caption of image 0
                      [0.0, 1, 0],   # caption of image 1
                      [0.0, 0, 1],   # caption of image 2
                      [1.0, 0, 0]])  # caption of image 2, points at image 0
    m = ev.retrieval_metrics(x, t, [0, 0, 1, 2, 2], ks=(1, 2))
    # image->text top-1: image 0 -> caption 1 (tied with 4, lower index wins) hit; 1 -> caption 0 (tied with
    # 2, lower index) miss; 2 -> caption 3 hit. Top-2: image 1 gets caption 2.
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3) and m["image_to_text_R@2"] == 1.0
    # text->image top-1: captions 1, 2, 3 hit; 0 and 4 miss. Top-2: caption 0 ranks image 0 second
    # (tied at 0 with image 2, lower index); caption 4 ranks image 2 third.
    assert m["text_to_image_R@1"] == pytest.approx(3 / 5) and m["text_to_image_R@2"] == pytest.approx(4 / 5)


def test_retrieval_matches_the_definition_on_random_tied_features():
    g = torch.Generator().manual_seed(1)
    # One-hot images make every score a single product, so equal scores are bitwise equal: many exact ties.
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (23,), generator=g), 4).float()
    t = torch.randint(-1, 3, (61, 4), generator=g).float()
    t[t.abs().sum(1) == 0] = 1.0
    text_to_image = torch.cat([torch.arange(23), torch.randint(0, 23, (38,), generator=g)]).tolist()
    ks = (1, 5, 10)
    got = ev.retrieval_metrics(3 * x, t, text_to_image, ks=ks, chunk=5)  # scale: features are normalized inside
    want = _reference_recalls(x, t, text_to_image, ks)
    assert got == pytest.approx(want)


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="at least one caption"):
        ev.retrieval_metrics(torch.eye(3), torch.eye(3)[:2], [0, 1])


# -----------------------------------------------------------------------------
# templates and class names


def test_roc_auc_by_hand():
    # Positives 0.9 and 0.4 against negatives 0.4, 0.1, 0.2: 0.9 beats all three, 0.4 beats two and ties one.
    assert ev.roc_auc([0.9, 0.4, 0.4, 0.1, 0.2], [True, True, False, False, False]) == pytest.approx(5.5 / 6)
    assert ev.roc_auc([3, 2, 1], [False, True, True]) == 0.0 and ev.roc_auc([5, 5], [True, False]) == 0.5
    assert math.isnan(ev.roc_auc([1.0, 2.0], [False, False]))


def test_gate_quality_by_hand():
    # Rows: raw text right / right / another image's / irrelevant / another image's / irrelevant / unknown;
    # captions right / wrong / right / right / wrong / right / unknown.
    truth = [[0, 0], [0, 1], [1, 0], [2, 0], [1, 1], [2, 0], [-1, -1]]
    w_s = [1.0, 0.5, 0.2, 1.0, 0.3, 0.4, 0.0]
    w_t = [1.0, 0.9, 0.5, 1.0, 2.0, 1.5, 9.0]
    w_c = [1.0, 1.1, 0.8, 1.0, 1.0, 1.2, 0.0]
    loss_raw = [0.1, 0.2, 3.0, 0.15, 2.0, 0.5, 9.0]
    loss_caption = [0.1, 0.1, 1.0, 0.1, 0.1, 0.9, 0.0]
    q = ev.gate_quality(torch.tensor(truth), torch.tensor(w_s), torch.tensor(w_t), torch.tensor(w_c),
                        torch.tensor(loss_raw), torch.tensor(loss_caption))
    assert q["n"] == 6
    assert q["w_s_clean"] == pytest.approx(0.75) and q["w_s_noisy"] == pytest.approx(0.475)
    # -w_s of the four wrong raw texts against the two right ones: 2 + 0.5 + 2 + 2 of 8 pairs.
    assert q["lcg_auc"] == pytest.approx(6.5 / 8)
    # The DCG's case: raw text wrong, caption right, flagged (w_s < 1): rows 2 and 5 (row 3 is not flagged, row 4's
    # caption is wrong). Row 2 weights the caption higher, row 5 the raw text.
    assert q["dcg_n"] == 2 and q["dcg_rate"] == 0.5
    assert q["loss_auc"] == pytest.approx(7 / 8)  # 0.15 is above 0.1 only
    assert q["loss_rate"] == 0.5  # row 2's raw-text loss is the higher, row 5's the lower
    # The CLIP baseline has no gates and no caption path: only the loss detector.
    assert ev.gate_quality(torch.tensor(truth), loss_raw=torch.tensor(loss_raw)) == {"n": 6, "loss_auc": q["loss_auc"]}


def test_plot_survives_missing_keys_one_line_and_a_torn_line(tmp_path):
    full, one, torn = tmp_path / "full", tmp_path / "one", tmp_path / "torn"
    for d in (full, one, torn):
        d.mkdir()
    records = [{"step": s, "loss": 5 - s / 10, "loss_raw": 3 - s / 10, "lr": 1e-3 * s, "w_s": 0.5,
                "truth/lcg_auc": 0.6 + s / 100} for s in range(1, 11)]
    records.insert(5, {"step": 5, "zeroshot/acc1": 0.4, "retrieval/image_to_text_R@10": 0.5})  # an evaluation
    (full / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (one / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss_raw": 2.0}) + "\n")
    (torn / "metrics.jsonl").write_text(json.dumps({"step": 1, "lr": 1e-3, "logit_scale": 14.3}) + "\n"
                                        + json.dumps({"step": 2, "lr": 2e-3}) + "\n" + '{"step": 3, "lr": 0.0')
    assert [r["step"] for r in ev.read_metrics(str(torn / "metrics.jsonl"))] == [1, 2]
    for runs in ([full], [one], [torn], [full, one, torn]):
        out = ev.plot_runs([str(d) for d in runs], str(tmp_path / "curves.png"))
        img = np.asarray(Image.open(out).convert("RGB"))
        assert img.shape[0] > 300 and img.shape[1] > 400
        # Something is drawn in the first series colour (blue), beyond the white page and black axes.
        assert (np.abs(img.astype(int) - ev.COLOURS[0]).sum(-1) < 30).sum() > 20
    # The command line, with the default output file in the run directory.
    ev.main(["plot", str(full)], load_model=None, presets=None)
    assert (full / "curves.png").is_file()
    with pytest.raises(data.UserError, match="no metrics.jsonl"):
        ev.main(["plot", str(tmp_path / "nothing")], load_model=None, presets=None)


def test_compare_runs_reads_the_last_values_and_gives_mean_and_sd(tmp_path):
    runs = {}
    for name, acc1s in (("clip", (0.2, 0.4)), ("alip", (0.9, 0.7))):
        for seed, acc1 in enumerate(acc1s):
            d = tmp_path / f"{name}-s{seed}"
            d.mkdir()
            records = [{"step": 1, "zeroshot/acc1": 0.05, "truth/lcg_auc": 0.5},  # overwritten by the last values
                       {"step": 2, "zeroshot/acc1": acc1, "truth/lcg_auc": 0.8 + seed / 10, "truth/dcg_n": 10 + seed},
                       {"step": 2, "loss": 1.0}]  # a log line after the evaluation keeps the evaluation's values
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            runs.setdefault(name, []).append(ev.final_metrics(str(d)))
    assert runs["alip"][1] == {"step": 2, "zeroshot/acc1": 0.7, "truth/lcg_auc": 0.9, "truth/dcg_n": 11, "loss": 1.0}
    table = ev.compare_runs({"CLIP": runs["clip"], "ALIP": runs["alip"]}).splitlines()
    sd = np.std([20, 40], ddof=1)  # the same for both: 14.142...
    assert table[0].startswith("| n=2 | zero-shot top-1 |") and set(table[1]) == {"|", "-"}
    assert table[2].startswith(f"| CLIP | 30.0 ± {sd:.1f} | - |")
    assert table[3].startswith(f"| ALIP | 80.0 ± {sd:.1f} |")
    assert f"ROC AUC 0.850 ± {np.std([0.8, 0.9], ddof=1):.3f}" in table[-2] and "of the 10 ± 1 samples" in table[-1]


def test_templates_and_classnames_assets(tmp_path):
    assert [len(ev.load_templates(n)) for n in ("openai_imagenet", "cifar", "simple")] == [80, 18, 7]
    cifar = ev.load_templates("cifar")
    assert cifar[0] == "a photo of a {c}." and cifar[-1] == "a photo of the big {c}." and len(set(cifar)) == 18
    names = ev.load_classnames("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(set(names)) == 998  # OpenAI's curated names repeat "missile" and "sunglasses"; kept as published
    (tmp_path / "t.txt").write_text("a {c} in the wild.\n\nart of {c}.\n")
    assert ev.load_templates(str(tmp_path / "t.txt")) == ["a {c} in the wild.", "art of {c}."]
    (tmp_path / "bad.txt").write_text("a photo of a {}.\n")
    with pytest.raises(ev.EvalError, match=r"placeholder \{c\}"):
        ev.load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(ev.EvalError, match="neither a file nor"):
        ev.load_templates("nope")
    with pytest.raises(ev.EvalError, match="no such file"):
        ev.load_classnames(str(tmp_path / "missing.txt"))


# -----------------------------------------------------------------------------
# zero-shot on every layout, with the oracle


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for name in NAMES[:4]:
        os.makedirs(root / name / "sub")
        solid(name).save(root / name / "a.png")
        solid(name, (9, 30)).save(root / name / "sub" / "b.JPG")
    solid("green").save(root / "red" / "wrong.png")  # a red-labelled green image: one miss
    (root / "red" / "notes.txt").write_text("not an image")
    return str(root)


def test_zeroshot_imagefolder(oracle, imagefolder):
    oracle.train()
    m = ev.zeroshot(oracle, imagefolder, templates="cifar", batch_size=4, workers=2)
    assert oracle.training and oracle.modes and not any(oracle.modes)  # eval inside, train mode restored
    assert m["acc1"] == pytest.approx(8 / 9)
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 3) / 4)
    assert math.isnan(m["acc5"])  # 4 classes
    assert all(isinstance(v, float) for v in m.values())


def test_an_image_file_too_large_to_decode_is_refused_by_name(oracle, tmp_path):
    for name in NAMES[:2]:
        os.makedirs(tmp_path / name)
        solid(name).save(tmp_path / name / "a.png")
    img = solid("red")
    img.save(tmp_path / "red" / "bomb.png")
    raw = bytearray((tmp_path / "red" / "bomb.png").read_bytes())
    ihdr = raw.index(b"IHDR")  # the header claims 20000 x 20000 pixels, above Pillow's limit
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", 20000, 20000)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    (tmp_path / "red" / "bomb.png").write_bytes(bytes(raw))
    with pytest.raises(ev.EvalError, match=r"cannot read image .*bomb.png: more pixels than Pillow's limit"):
        ev.zeroshot(oracle, str(tmp_path), templates="simple", batch_size=2)


def test_zeroshot_cifar_and_classnames_file(oracle, tmp_path):
    folder = write_cifar(str(tmp_path / "cifar-10-batches-py"))
    m = ev.zeroshot(oracle, folder, templates="simple", batch_size=5)
    assert m == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    # Class names in a different order than the labels: every prediction is wrong.
    (tmp_path / "names.txt").write_text("\n".join(NAMES[1:] + NAMES[:1]) + "\n")
    m = ev.zeroshot(oracle, folder, classnames=str(tmp_path / "names.txt"), templates=["{c}"])
    assert m["acc1"] == 0.0
    folder = write_cifar(str(tmp_path / "cifar-100-python"), cifar100=True)
    assert ev.read_classification(folder)[1] == [f"light {n}" for n in NAMES]
    assert ev.zeroshot(oracle, folder, templates="cifar")["acc1"] == 1.0
    with pytest.raises(ev.EvalError, match="splits train and test"):
        ev.zeroshot(oracle, folder, split="val")


def test_zeroshot_shards(oracle, tmp_path):
    samples = [{"png": png(solid(n)), "cls": str(label).encode()} for label, n in enumerate(NAMES)]
    samples.append({"cls": b"0"})  # no image: skipped and counted
    folder = write_shards(str(tmp_path / "test"), samples)
    with pytest.raises(ev.EvalError, match="classnames.txt"):
        ev.zeroshot(oracle, folder)
    (tmp_path / "classnames.txt").write_text("\n".join(NAMES) + "\n")  # one level up, as clip_benchmark's wds
    metrics, info = ev._zeroshot(oracle, folder + "/shard-{00000..00002}.tar", None, "simple", 4, 0, None, None)
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert info["num_images"] == len(NAMES) and sum(info["skipped"].values()) == 1


# -----------------------------------------------------------------------------
# retrieval on both layouts, with the oracle


def _captions(name):
    return [f"a {name} square", f"something {name}", f"{name}"]


def test_retrieval_karpathy(oracle, tmp_path):
    os.makedirs(tmp_path / "coco" / "val2014")
    entries = []
    for i, name in enumerate(NAMES):
        solid(name).save(tmp_path / "coco" / "val2014" / f"{i}.jpg")
        # One misleading caption, last so that it cannot win a tie against green's own captions.
        captions = _captions(name) + (["a green thing"] if name == NAMES[-1] else [])
        entries.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": "test",
                        "sentences": [{"raw": c + " ", "tokens": c.split()} for c in captions]})
    entries.append({"filepath": "val2014", "filename": "train.jpg", "split": "train", "sentences": []})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    metrics, info = ev._retrieval(oracle, str(tmp_path / "dataset_coco.json"), str(tmp_path / "coco"), "test", "",
                                  3, 2, None)
    n_captions = 3 * len(NAMES) + 1
    assert info["num_images"] == len(NAMES) and info["num_captions"] == n_captions
    assert metrics["image_to_text_R@1"] == 1.0
    assert metrics["text_to_image_R@1"] == pytest.approx((n_captions - 1) / n_captions)
    assert metrics["text_to_image_R@10"] == 1.0
    os.remove(tmp_path / "coco" / "val2014" / "3.jpg")
    with pytest.raises(ev.EvalError, match="3.jpg"):
        ev.retrieval(oracle, str(tmp_path / "dataset_coco.json"), images=str(tmp_path / "coco"))


def test_retrieval_shards_several_captions(oracle, tmp_path):
    samples = [{"webp": png(solid(n)), "txt": ("\n".join(_captions(n)) + "\n\n").encode()} for n in NAMES]
    samples.insert(2, {"png": png(solid("red")), "txt": b"\n"})  # no caption: skipped
    m = ev.retrieval(oracle, write_shards(str(tmp_path / "shards"), samples), batch_size=2)
    assert m == {f"{d}_R@{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}


# -----------------------------------------------------------------------------
# linear probe


def test_fit_logistic_reaches_the_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=-1)
    y = torch.randint(0, 4, (200,), generator=g)
    w, b = ev.fit_logistic(x, y, 4, l2=1e-2)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 1e-2 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4  # stationary point of a convex objective
    w_strong, _ = ev.fit_logistic(x, y, 4, l2=1e2)
    assert w_strong.abs().max() < 1e-2


def test_probe_on_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (400,), generator=g)
    x = torch.nn.functional.normalize(centers[y] + 0.8 * torch.randn(400, 16, generator=g), dim=-1)
    result = ev.probe(x[:300], y[:300], x[300:], y[300:], max_iter=200)
    assert result["acc1"] > 0.9 and result["val_acc1"] > 0.9
    assert 1e-6 <= result["l2"] <= 1e2
    assert round(math.log10(result["l2"]) * 4) == pytest.approx(math.log10(result["l2"]) * 4)  # on the grid


def test_linear_probe_cifar(oracle, tmp_path):
    folder = write_cifar(str(tmp_path / "cifar"), per_class=3)
    result = ev.linear_probe(oracle, folder, folder, batch_size=16)
    assert result["acc1"] == 1.0 and result["mean_per_class_recall"] == 1.0
    assert result["num_train"] == 5 * 3 * len(NAMES) and result["num_test"] == 3 * len(NAMES)


def test_linear_probe_refuses_test_classes_that_train_lacks(oracle, tmp_path):
    for split, names in (("train", NAMES[:2]), ("test", NAMES[:3])):
        for name in names:
            os.makedirs(tmp_path / split / name)
            solid(name).save(tmp_path / split / name / "a.png")
    with pytest.raises(ev.EvalError, match="1 classes that .*train lacks"):
        ev.linear_probe(oracle, str(tmp_path / "train"), str(tmp_path / "test"), batch_size=16)


def test_split_is_refused_where_the_path_is_the_split(oracle, imagefolder, tmp_path):
    with pytest.raises(ev.EvalError, match="--split train: .* an ImageFolder, whose path is the split"):
        ev.zeroshot(oracle, imagefolder, templates="simple", split="train")
    folder = write_cifar(str(tmp_path / "cifar"), per_class=1)
    assert ev.zeroshot(oracle, folder, templates="simple", split="train")["acc1"] == 1.0  # CIFAR has splits


# -----------------------------------------------------------------------------
# layouts and errors


def test_layout_errors(oracle, tmp_path):
    with pytest.raises(ev.EvalError, match="no such file"):
        ev.zeroshot(oracle, str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(png(solid("red")))
    with pytest.raises(ev.EvalError, match="cannot tell the dataset layout"):
        ev.zeroshot(oracle, str(tmp_path / "flat"))
    with pytest.raises(data.UserError, match="2 of its 2 shards do not exist"):
        ev.zeroshot(oracle, str(tmp_path / "x-{0..1}.tar"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ev.EvalError, match="no images"):
        ev.zeroshot(oracle, str(tmp_path / "empty"))
    with pytest.raises(ev.EvalError, match="retrieval needs"):
        ev.retrieval(oracle, str(tmp_path / "empty"))


# -----------------------------------------------------------------------------
# command line with the real tiny model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    alip = pytest.importorskip("alip")
    torch.manual_seed(0)
    model = alip.create_model("tiny")
    path = tmp_path_factory.mktemp("run") / "ckpt-00000000.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 0}, path)
    return str(path)


def main(argv):
    alip = pytest.importorskip("alip")
    ev.main(argv, load_model=alip.load_model, presets=alip.PRESETS)


def _run_cli(capsys, *argv):
    main(list(argv) + ["--json", "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr()
    return json.loads(out.out), out.err.splitlines()  # stdout is the JSON object alone; the table is on stderr


def test_cli_zeroshot_retrieval_and_probe(capsys, checkpoint, imagefolder, tmp_path):
    result, lines = _run_cli(capsys, "zeroshot", "--checkpoint", os.path.dirname(checkpoint),
                             "--dataset", imagefolder, "--templates", "simple")
    assert result["task"] == "zeroshot" and result["num_images"] == 9 and result["acc5"] is None
    assert 0 <= result["acc1"] <= 1 and any("acc1" in line for line in lines)

    samples = [{"png": png(solid(n)), "txt": "\n".join(_captions(n)).encode()} for n in NAMES]
    shards = write_shards(str(tmp_path / "shards"), samples)
    result, _ = _run_cli(capsys, "retrieval", "--checkpoint", checkpoint, "--dataset", shards,
                         "--caption-prefix", "a photo of ")
    assert result["num_captions"] == 3 * len(NAMES)
    assert all(0 <= result[f"{d}_R@{k}"] <= 1 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert result["text_to_image_R@5"] <= result["text_to_image_R@10"] == 1.0  # only 7 images

    result, _ = _run_cli(capsys, "linear-probe", "--checkpoint", checkpoint, "--train", imagefolder,
                         "--test", imagefolder)
    assert 0 <= result["acc1"] <= 1 and 1e-6 <= result["l2"] <= 1e2


def test_cli_errors(tmp_path, checkpoint, imagefolder):
    with pytest.raises(ev.EvalError, match="nope.pt: no such file"):
        main(["zeroshot", "--checkpoint", str(tmp_path / "nope.pt"), "--dataset", imagefolder])
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    with pytest.raises(ev.EvalError, match="garbage.pt: cannot load it"):
        main(["zeroshot", "--checkpoint", str(tmp_path / "garbage.pt"), "--dataset", imagefolder])
    with pytest.raises(ev.EvalError, match="no_dataset: no such file"):
        main(["zeroshot", "--checkpoint", checkpoint, "--dataset", str(tmp_path / "no_dataset")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast path)")
def test_zeroshot_and_retrieval_on_cuda_in_bf16(checkpoint, imagefolder, tmp_path):
    import alip
    model = alip.load_model(checkpoint).cuda().train()
    m = ev.zeroshot(model, imagefolder, templates="simple", dtype=torch.bfloat16)
    assert model.training and 0 <= m["acc1"] <= 1
    samples = [{"png": png(solid(n)), "txt": n.encode()} for n in NAMES]
    m = ev.retrieval(model, write_shards(str(tmp_path / "shards"), samples), dtype=torch.bfloat16)
    assert all(0 <= v <= 1 for v in m.values())
