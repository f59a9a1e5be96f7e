"""eval.py: measurement. The metrics; evaluating a CLIP-style model as the ALIP paper does (zero-shot classification,
image-text retrieval, linear probe); the gates' quality against a data set's truth; a training run's log (its log
lines, metrics.jsonl and the TensorBoard / W&B reporters) and curves; the comparison of runs; and the export of a
trained model to where CLIP models are used elsewhere (open_clip, Hugging Face transformers).

    python eval.py zeroshot --checkpoint runs/alip --dataset /data/imagenet/val --templates openai_imagenet
    python eval.py zeroshot --checkpoint runs/alip --dataset /data/cifar-10-batches-py --templates cifar
    python eval.py retrieval --checkpoint runs/alip --dataset /data/coco/dataset_coco.json --images /data/coco
    python eval.py linear-probe --checkpoint runs/alip --train /data/cifar-10-batches-py \\
        --test /data/cifar-10-batches-py
    python eval.py plot runs/demo/clip runs/demo/alip          # curves of one or more runs, overlaid
    python eval.py export runs/alip --format open_clip --out alip.pt   # for open_clip.create_model(NAME, pretrained=)
    python eval.py export runs/alip --format hf --out alip-hf/         # for transformers' CLIPModel.from_pretrained

Each prints a table; with --json, stdout is one JSON object (metrics as fractions) and the table goes to stderr.
--checkpoint takes a run directory (its latest checkpoint), a ckpt-*.pt file, or an OpenAI / open_clip /
ALIP-release state dict (add --model ViT-B-32 and --quick-gelu for OpenAI's weights; without --model, its shapes
tell the architecture but for the attention heads: its preset's, else 64 wide, else --head-width).

Dataset layouts, told apart by the path:
  ImageFolder   a directory with one sub-directory per class (sorted names = labels 0..C-1)
  CIFAR         cifar-10-batches-py/ or cifar-100-python/ as unpacked from the official python tarballs
  shards        WebDataset .tar files (a directory, a glob, "a/{000..009}.tar"): an image member plus
                "cls" (ascii int) for classification, or "txt" (one caption per line) for retrieval;
                class names from classnames.txt next to the shards (or one level up) or --classnames
  Karpathy      dataset_coco.json / dataset_flickr30k.json plus the image folder (--images)
--split picks the CIFAR or Karpathy split (default test); for the other layouts the path is the split.

Features are computed under the autocast dtype the caller passes (dtype=None: fp32); the command line
takes it from --precision (default fp32, the ALIP authors' protocol) through data.choose_compute, the
one device and precision choice of every command, and records it in its output.

Templates hold the class name as "{c}" (CLIP_benchmark's placeholder); it is substituted with
str.replace, so class names with braces are safe. Ties in any ranking go to the lower index, exactly as
a stable descending sort would order them, so every metric is deterministic.
"""
import collections
import contextlib
import dataclasses
import importlib
import json
import math
import os
import pickle
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data

IMAGE_PROBLEMS = {"empty_image": "the file is empty", "not_an_image": "not an image Pillow can read",
                  "corrupt_image": "truncated or corrupt", "image_too_large": "more pixels than Pillow's limit "
                  "(a decompression bomb?)", "unsupported_mode": "a pixel format with no faithful RGB picture "
                  "(floating-point or 32-bit samples, say)"}  # data.decode_image's reasons, for a message
ZEROSHOT_LOGIT_SCALE = 100.0  # CLIP's fixed zero-shot temperature; irrelevant to the ranking, kept for the logits


class EvalError(data.UserError):
    """A problem the user can fix (a path, a layout, class names): one line on stderr, exit status 2."""


# -----------------------------------------------------------------------------
# metrics


def _rank_of(scores, target):
    """Rank (0 = first) of column target[i] in row i of scores (N, M) sorted descending, ties to the lower
    index. Counting who is ahead avoids an (N, M) sort. Rows with a non-finite score count as misses
    (rank M): otherwise a diverged model, whose NaNs compare false to everything, would rank first."""
    s = scores.gather(1, target[:, None])  # (N, 1)
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > s) | ((scores == s) & (index < target[:, None]))  # (N, M)
    rank = ahead.sum(1)
    return torch.where(torch.isfinite(scores).all(1), rank, torch.full_like(rank, scores.shape[1]))


def classification_metrics(logits, labels):
    """acc1, acc5 and mean per-class recall (sklearn's balanced accuracy: classes absent from labels are
    left out of the mean) as fractions; acc5 is NaN with fewer than 5 classes, where it means nothing."""
    logits = torch.as_tensor(logits).float()  # (N, C)
    labels = torch.as_tensor(labels).long().to(logits.device)  # (N,)
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(f"need logits (N, C) and labels (N,) with N > 0, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels span {labels.min().item()}..{labels.max().item()}, logits have {num_classes} classes")
    rank = _rank_of(logits, labels)
    hit = (rank == 0).double()  # float64 so that 46/1000 prints as 0.046
    count = torch.bincount(labels, minlength=num_classes).double()
    recall = torch.bincount(labels, weights=hit, minlength=num_classes) / count.clamp(min=1)
    return {
        "acc1": hit.mean().item(),
        "acc5": (rank < 5).double().mean().item() if num_classes >= 5 else math.nan,
        "mean_per_class_recall": recall[count > 0].mean().item(),
    }


def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10), chunk=1024):
    """Recall@k both ways, as CLIP_benchmark computes them. Image->text: an image scores when any of its
    captions is among its top k texts. Text->image: per caption, its image among the top k images.
    Features are L2-normalized here; text_to_image[j] is caption j's image index."""
    x = F.normalize(torch.as_tensor(image_features).float(), dim=-1)  # (I, D)
    t = F.normalize(torch.as_tensor(text_features).float(), dim=-1)  # (T, D)
    text_to_image = torch.as_tensor(text_to_image).long().to(x.device)  # (T,)
    if text_to_image.shape != t.shape[:1] or len(t) == 0:
        raise ValueError(f"text_to_image needs one image index per caption ({len(t)}), "
                         f"got {tuple(text_to_image.shape)}")
    captions_per_image = torch.bincount(text_to_image, minlength=len(x))
    if len(captions_per_image) > len(x) or (captions_per_image == 0).any():
        raise ValueError("every image needs at least one caption and every caption an image index < number of images")
    i2t, t2i = [], []
    # Chunks keep the score matrix small: COCO 5k is 5,000 x 25,010.
    for start in range(0, len(x), chunk):
        scores = x[start:start + chunk] @ t.T  # (B, T)
        own = text_to_image[None, :] == torch.arange(start, start + len(scores), device=x.device)[:, None]
        # The image's best caption (highest score, then lowest index) has the best rank of all its captions.
        best = scores.masked_fill(~own, -math.inf).amax(1, keepdim=True)  # (B, 1)
        best_index = (own & (scores == best)).float().argmax(1)  # argmax returns the first maximum
        i2t.append(_rank_of(scores, best_index))
    for start in range(0, len(t), chunk):
        t2i.append(_rank_of(t[start:start + chunk] @ x.T, text_to_image[start:start + chunk]))
    i2t, t2i = torch.cat(i2t), torch.cat(t2i)
    metrics = {f"image_to_text_R@{k}": (i2t < k).double().mean().item() for k in ks}
    metrics.update({f"text_to_image_R@{k}": (t2i < k).double().mean().item() for k in ks})
    return metrics


# -----------------------------------------------------------------------------
# gate quality: the gates, and the per-sample loss as a plain detector, against a data set's truth


def roc_auc(scores, positive):
    """ROC AUC of scores for telling the positive samples (bool) from the rest: the Mann-Whitney U statistic,
    ties counted half. NaN unless both kinds occur."""
    scores, positive = torch.as_tensor(scores).double().flatten(), torch.as_tensor(positive).bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # samples with a smaller score, per distinct score
    rank = (below + (counts + 1) / 2)[inverse]  # 1-based ranks, the mean rank over each run of ties
    return ((rank[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def _mean(x):
    return x.double().mean().item() if len(x) else math.nan


def gate_quality(truth, w_s=None, w_t=None, w_c=None, loss_raw=None, loss_caption=None):
    """The gates, and the per-sample loss as a plain detector, against the truth a data set records.

    truth (N, 2) int: raw text 0 right, 1 about another image, 2 irrelevant; caption 0 right, 1 wrong; -1 unknown.
    LCG: mean w_s on right and on wrong raw texts, and the ROC AUC of -w_s for flagging wrong raw texts. DCG: on
    the samples the LCG flags (w_s < 1) whose raw text is wrong and caption right, the share with w_t < w_c (the
    pair weights favour the right source). The per-sample raw-text loss gets the same AUC (a high loss flags),
    and with the caption loss the same share (loss_raw > loss_caption). Only what is given is reported.
    """
    truth = torch.as_tensor(truth).long()
    known, noisy = truth[:, 0] >= 0, truth[:, 0] > 0
    out = {"n": int(known.sum())}
    # The DCG's case: raw text wrong, caption right; with w_s, only the samples the LCG flags.
    case = noisy & (truth[:, 1] == 0)
    if w_s is not None:
        w_s = torch.as_tensor(w_s)
        out.update(w_s_clean=_mean(w_s[known & ~noisy]), w_s_noisy=_mean(w_s[known & noisy]),
                   lcg_auc=roc_auc(-w_s[known], noisy[known]))
        case = case & (w_s < 1)
        if w_t is not None and w_c is not None:
            w_t, w_c = torch.as_tensor(w_t), torch.as_tensor(w_c)
            out.update(dcg_n=int(case.sum()), dcg_rate=_mean((w_t < w_c)[case]))
    if loss_raw is not None:
        loss_raw = torch.as_tensor(loss_raw)
        out["loss_auc"] = roc_auc(loss_raw[known], noisy[known])
        if loss_caption is not None:
            out["loss_rate"] = _mean((loss_raw > torch.as_tensor(loss_caption))[case])
    return out


class GateMeter:
    """Per-sample gate weights and losses of the training steps since the last log line, next to the truth the
    data record about each sample (data.parse_truth); figures() is gate_quality over every rank's samples.
    sample_losses(x, t, s): each sample's unweighted loss against this rank's batch, the plain detector of noisy
    samples that the gates are compared to."""

    def __init__(self, sample_losses, rank=0, world_size=1):
        self.sample_losses, self.rank, self.world_size, self.rows = sample_losses, rank, world_size, []

    @torch.no_grad()
    def add(self, truth, feats, scale, weights=None):
        """truth (n, 2); feats: this rank's step features (x, t, c), c None for the CLIP baseline; scale: the step's
        logit scale; weights: the gate weights (w_s, w_t, w_c) of the global batch, or None."""
        x, t, c = (None if f is None else F.normalize(f.float(), dim=-1) for f in feats)
        rows = {"truth": truth, "loss_raw": self.sample_losses(x, t, scale)}
        if c is not None:
            rows["loss_caption"] = self.sample_losses(x, c, scale)
        if weights is not None:
            mine = slice(self.rank * len(x), (self.rank + 1) * len(x))
            rows.update(zip(("w_s", "w_t", "w_c"), (w[mine] for w in weights)))
        self.rows.append({k: v.detach().cpu() for k, v in rows.items()})

    def figures(self):
        """gate_quality's figures since the last call, NaNs left out; {} without truth. Every rank calls it."""
        rows, self.rows = self.rows, []
        if self.world_size > 1:
            every = [None] * self.world_size
            torch.distributed.all_gather_object(every, rows)
            rows = [r for rank_rows in every for r in rank_rows]
        if not rows:
            return {}
        q = gate_quality(**{k: torch.cat([r[k] for r in rows]) for k in rows[0]})
        return {k: v for k, v in q.items() if math.isfinite(v)}  # NaN: a case without samples (not JSON either)


class TrainLog:
    """A training run's log lines: each call of `line` turns a step's values into a metrics record and its text.
    Every rank calls it with its own values, and the record holds their means over the ranks (each rank's loss and
    gate weights cover its share of the batch). Samples/s and the ETA come from data.Progress: the rate since the
    previous line, the ETA at the mean rate since the first."""

    def __init__(self, step, total, samples_per_step, world_size=1):
        self.total, self.samples, self.world_size = total, samples_per_step, world_size
        self.progress = data.Progress(total, step)
        self.skipped = {}

    def line(self, step, logs, skipped=None, truth=None, **values):
        """(record, text) of `step`: logs (0-dim tensors, averaged over the ranks), values (numbers, as they are),
        skipped (the run's counts by reason, recorded when they change) and gate_quality's figures."""
        steps_per_s, eta = self.progress.measure(step)
        means = torch.stack([v.float() for v in logs.values()])
        if self.world_size > 1:
            torch.distributed.all_reduce(means)
            means /= self.world_size
        r = {"step": step, **dict(zip(logs, means.tolist())), **values, "samples_per_s": steps_per_s * self.samples}
        r.update({f"truth/{k}": v for k, v in (truth or {}).items()})
        if skipped and dict(skipped) != self.skipped:
            r["skipped"] = self.skipped = dict(skipped)
        return r, f"step {step}/{self.total} {summary(r, skipped)} ETA {data.duration(eta)}"


def summary(record, skipped=None):
    """A log line's text for a metrics record: a training step's loss, gates, scale, lr, speed, the skipped samples
    by reason (`skipped`, the run's counts so far) and the gate quality; or an evaluation's results."""
    r, parts = record, []
    if "loss" not in r:  # an evaluation
        return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
    parts.append(f"loss {r['loss']:.4f}")
    if "loss_caption" in r:  # ALIP's two paths and gates; the CLIP baseline has neither
        plain = (f"; unweighted {r['loss_raw_unweighted']:.3f} / {r['loss_caption_unweighted']:.3f}"
                 if "loss_raw_unweighted" in r else "")
        parts.append(f"(raw {r['loss_raw']:.3f} cap {r['loss_caption']:.3f}{plain}) w_s {r['w_s']:.3f} "
                     f"w_t {r['w_t']:.3f} w_c {r['w_c']:.3f} H_tc {r['H_tc']:.3f} H_xt {r['H_xt']:.3f} "
                     f"H_xc {r['H_xc']:.3f}")
    parts.append(f"scale {r['logit_scale']:.1f} lr {r['lr']:.2e} {r['samples_per_s']:.0f} samples/s")
    if skipped:
        common = sorted(skipped.items(), key=lambda kv: -kv[1])
        parts.append(f"skipped {sum(skipped.values())} (" + ", ".join(f"{k} {n}" for k, n in common[:3])
                     + (", ..." if len(common) > 3 else "") + ")")
    truth = {k[len("truth/"):]: v for k, v in r.items() if k.startswith("truth/")}
    return " ".join(parts) + (" | " + gate_summary(truth) if truth else "")


def gate_summary(q):
    """A progress line's short form of gate_quality's figures."""
    parts = [f"w_s right/wrong raw {q['w_s_clean']:.2f}/{q['w_s_noisy']:.2f} LCG AUC {q['lcg_auc']:.3f}"
             if "lcg_auc" in q else "", f"DCG {q['dcg_rate']:.3f}" if "dcg_rate" in q else "",
             f"loss AUC {q['loss_auc']:.3f}" if "loss_auc" in q else ""]
    return "truth: " + " ".join(p for p in parts if p)


# -----------------------------------------------------------------------------
# templates and class names


def _read_lines(path, what):
    """The non-blank lines of a UTF-8 text file (a byte-order mark is dropped), stripped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise EvalError(f"{what} {path!r}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise EvalError(f"{what} {path!r}: cannot read it ({e.strerror})") from e


def load_templates(spec):
    """A name in assets/templates.json ("openai_imagenet": CLIP's 80, "cifar": CLIP's 18, "simple": the 7
    of OpenAI's prompt-engineering notebook), a text file with one template per line, or a list."""
    if isinstance(spec, (list, tuple)):
        templates = list(spec)
    else:
        with open(os.path.join(data.ASSETS, "templates.json")) as f:
            named = json.load(f)
        if spec in named:
            templates = named[spec]
        elif os.path.isfile(spec):
            templates = _read_lines(spec, "templates")
        else:
            raise EvalError(f"templates {spec!r}: neither a file nor one of {', '.join(named)}")
    bad = [t for t in templates if "{c}" not in t]
    if not templates or bad:
        raise EvalError(f"templates {spec!r}: each template needs the placeholder {{c}} (e.g. 'a photo of a {{c}}.'), "
                        f"{len(bad)} of {len(templates)} lack it{': ' + repr(bad[0]) if bad else ''}")
    return templates


def load_classnames(spec):
    """A text file (one name per line, in label order) or "imagenet" for assets/imagenet_classnames.txt."""
    path = os.path.join(data.ASSETS, "imagenet_classnames.txt") if spec == "imagenet" else spec
    if not os.path.isfile(path):
        raise EvalError(f"class names {spec!r}: no such file; give a text file with one class name per line, "
                        "in label order")
    names = _read_lines(path, "class names")
    if not names:
        raise EvalError(f"class names {path}: the file is empty")
    return names


def _readable(name):
    return name.replace("_", " ")  # CIFAR-100's "aquarium_fish", folder names like "golden_retriever"


# -----------------------------------------------------------------------------
# datasets: each reader returns samples as (image source, target); a source is a file path, an HWC uint8
# array (CIFAR) or encoded bytes (shards), turned into a PIL image by _open_image.


def _layout(path):
    if any(ch in path for ch in "*?{") or "::" in path or path.endswith((".tar", ".tar.gz")):
        return "shards"
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return "karpathy"
        raise EvalError(f"{path}: a file, but neither a Karpathy-split .json nor a .tar shard")
    entries = os.listdir(path)
    if "batches.meta" in entries or ("meta" in entries and "test" in entries):
        return "cifar"
    if any(e.endswith((".tar", ".tar.gz")) for e in entries):
        return "shards"
    if any(os.path.isdir(os.path.join(path, e)) for e in entries):
        return "imagefolder"
    raise EvalError(f"{path}: cannot tell the dataset layout; expected an ImageFolder (one sub-folder of images "
                    "per class), a CIFAR python directory (batches.meta or meta), WebDataset .tar shards, "
                    "or a Karpathy-split .json")


def check_dataset(path, flag):
    """A UserError naming `flag` where path is no data set that eval.py reads: for a run to find out before it trains,
    not at its first evaluation."""
    try:
        if _layout(path) == "shards":
            data.find_shards(path, every=True)
    except data.UserError as e:
        raise data.UserError(f"{flag} {e}") from e


class _CifarUnpickler(pickle.Unpickler):
    """Pickles can run code on load: allow only what the CIFAR files hold (numpy arrays and builtins)."""

    def find_class(self, module, name):
        numpy_array = module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar")
        if numpy_array or (module, name) == ("_codecs", "encode"):  # the latter: bytes in protocol-2 pickles
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR pickle")


def _unpickle(path):
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="bytes").load()  # the files were written by Python 2


def _read_cifar(path, split):
    if split not in ("train", "test"):
        raise EvalError(f"{path}: CIFAR has the splits train and test, not {split!r}")
    cifar10 = os.path.exists(os.path.join(path, "batches.meta"))
    if cifar10:
        names = _unpickle(os.path.join(path, "batches.meta"))[b"label_names"]
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = _unpickle(os.path.join(path, "meta"))[b"fine_label_names"]
        files = ["train"] if split == "train" else ["test"]
    samples = []
    for name in files:
        batch = _unpickle(os.path.join(path, name))
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW
        labels = batch[b"labels" if cifar10 else b"fine_labels"]
        samples += list(zip(images, labels))
    return samples, [_readable(n.decode()) for n in names]


def _read_imagefolder(path):
    classes = sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
    samples = []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(os.path.join(path, name), followlinks=True)):
            samples += [(os.path.join(root, f), label) for f in sorted(files)
                        if f.lower().rpartition(".")[2] in data.IMAGE_EXTS]
    if not samples:
        raise EvalError(f"{path}: no images ({', '.join(data.IMAGE_EXTS)}) in its sub-folders; for shards, "
                        "give the folder that holds the .tar files")
    if len(classes) == 1000 and all(re.fullmatch(r"n\d{8}", c) for c in classes):
        return samples, load_classnames("imagenet")  # ImageNet's sorted WordNet ids are its label order
    return samples, [_readable(c) for c in classes]


def _iter_shard_samples(shards, key, parse, skipped):
    """(image bytes, parse(sample[key])) per sample; samples lacking either are counted in skipped."""
    for sample in data.iter_samples(shards, skipped):
        image = next((sample[k] for k in data.IMAGE_EXTS if k in sample), None)
        if image is None or key not in sample:
            skipped[f"no image or no .{key}"] += 1
            continue
        try:
            target = parse(sample[key])
        except ValueError:  # not UTF-8, or a label that is not an integer
            skipped[f"unreadable .{key}"] += 1
            continue
        if target is None:
            skipped[f"empty .{key}"] += 1
            continue
        yield image, target


def _shard_classnames(shards):
    # clip_benchmark's wds_* exports keep classnames.txt one level above the split's shards
    for folder in (os.path.dirname(shards[0]), os.path.dirname(os.path.dirname(shards[0]))):
        if os.path.isfile(os.path.join(folder, "classnames.txt")):
            return load_classnames(os.path.join(folder, "classnames.txt"))
    return None


def _split(path, layout, split):
    """The split to read: `split`, "test" by default, for CIFAR and Karpathy files; refused for the layouts whose path
    is the split, where it would be ignored."""
    if layout in ("cifar", "karpathy"):
        return split or "test"
    if split is not None:
        kind = "shards" if layout == "shards" else "an ImageFolder"
        raise EvalError(f"--split {split}: {path} is {kind}, whose path is the split; --split is for CIFAR (train, "
                        "test) and Karpathy files")
    return None


def read_classification(path, split=None, classnames=None):
    """(samples, class names, skipped) for an ImageFolder, CIFAR or shard dataset; samples is a list, or a
    lazy iterator for shards. classnames (a file, "imagenet" or a list) overrides the dataset's own names,
    which are None for shards without a classnames.txt."""
    layout = _layout(path)
    skipped = collections.Counter()
    if layout == "cifar":
        samples, names = _read_cifar(path, _split(path, layout, split))
    elif layout == "imagefolder":
        _split(path, layout, split)
        samples, names = _read_imagefolder(path)
    elif layout == "shards":
        _split(path, layout, split)
        shards = data.find_shards(path, every=True)
        samples = _iter_shard_samples(shards, "cls", lambda raw: int(raw.decode().strip()), skipped)
        names = _shard_classnames(shards)
    else:
        raise EvalError(f"{path}: a Karpathy retrieval file; classification needs an ImageFolder, CIFAR or shards")
    if classnames is not None:
        given = load_classnames(classnames) if isinstance(classnames, str) else list(classnames)
        if names is not None and len(given) != len(names):
            raise EvalError(f"class names {classnames if isinstance(classnames, str) else ''}: {len(given)} names, but "
                            f"{path} has {len(names)} classes; give one name per class, in label order")
        names = given
    return samples, names, skipped


def _read_karpathy(path, images, split):
    try:
        with open(path, encoding="utf-8") as f:
            entries = [(e.get("filepath", ""), e["filename"], [s["raw"].strip() for s in e["sentences"]])
                       for e in json.load(f)["images"] if e["split"] == split]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or JSON of another layout
        raise EvalError(f"{path}: not a Karpathy-split JSON ({type(e).__name__}: {e}); expected "
                        '{"images": [{"filename", "split", "sentences": [{"raw"}, ...]}, ...]}') from e
    if not entries:
        raise EvalError(f"{path}: no images in split {split!r} (Karpathy splits: train, restval, val, test)")
    root = images or os.path.dirname(path)
    samples, missing = [], []
    for folder, filename, captions in entries:
        candidates = [os.path.join(root, folder, filename), os.path.join(root, filename)]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            missing.append(candidates[0])
        samples.append((found, captions))
    if missing:
        raise EvalError(f"{len(missing)} of {len(entries)} images not found, e.g. {missing[0]}; pass --images, the "
                        "folder that holds val2014/ (COCO) or the Flickr30k images")
    return samples


def read_retrieval(path, images=None, split=None):
    """(samples, skipped) with samples (image source, [captions]) from a Karpathy JSON or caption shards."""
    layout = _layout(path)
    skipped = collections.Counter()
    if layout == "karpathy":
        return _read_karpathy(path, images, _split(path, layout, split)), skipped
    if layout == "shards":
        _split(path, layout, split)
        def captions(raw):  # one caption per line
            return [line.strip() for line in raw.decode().splitlines() if line.strip()] or None
        return _iter_shard_samples(data.find_shards(path, every=True), "txt", captions, skipped), skipped
    raise EvalError(f"{path}: looks like {'CIFAR' if layout == 'cifar' else 'an ImageFolder'}; retrieval needs a "
                    "Karpathy-split .json or shards with .txt captions")


def _open_image(source):
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    if isinstance(source, (str, os.PathLike)):  # a file: read whole, decoded as a shard member is
        with open(source, "rb") as f:
            source = f.read()
    # Decompression bombs are refused from the header, as in training, but at Pillow's own limit (179M pixels):
    # training may skip an image, an evaluation must score every one.
    try:
        return data.decode_image(source, max_pixels=None)
    except ValueError as e:
        raise ValueError(IMAGE_PROBLEMS.get(str(e), str(e))) from None


# -----------------------------------------------------------------------------
# feature extraction


def autocast(device, dtype):
    """Autocast to dtype on device, or nothing for dtype None (fp32): the one place training and evaluation enter
    mixed precision (data.choose_compute picks the dtype)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _progress(progress, what, done, final=False):
    """Feature extraction's progress line (data.Progress): `what` done so far, of how many, at what rate."""
    if final or progress.due():
        rate, eta = progress.measure(done)
        left = f", ETA {data.duration(eta)}" if progress.total else ""
        progress.show(f"{what}: {done}{f'/{progress.total}' if progress.total else ''}, {rate:.0f}/s{left}", final)


def _loaded_batches(samples, load, batch_size, workers):
    """Lists of load(sample), batch_size at a time; with workers > 0, threads decode the next two batches
    while the model runs on this one (PIL and torch release the GIL while decoding and resizing)."""
    def chunks():
        chunk = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    if workers <= 0:
        for chunk in chunks():
            yield [load(s) for s in chunk]
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for chunk in chunks():
            pending.append([pool.submit(load, s) for s in chunk])
            if len(pending) > 2:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


@torch.no_grad()
def encode_images(model, samples, device, batch_size=256, workers=0, total=None, dtype=None):
    """Normalized fp32 image features (N, D) on the CPU and the samples' targets, in order."""
    transform = data.eval_transform(model.config.image_size)

    def load(sample):
        source, target = sample
        try:
            return transform(_open_image(source)), target
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot read image {source if isinstance(source, str) else 'in shards'}: {e}") from e

    features, targets, progress = [], [], data.Progress(total)
    for batch in _loaded_batches(samples, load, batch_size, workers):
        images = torch.stack([image for image, _ in batch]).to(device, non_blocking=True)  # (B, 3, S, S)
        with autocast(device, dtype):
            x = model.encode_image(images)
        features.append(F.normalize(x.float(), dim=-1).cpu())
        targets += [target for _, target in batch]
        _progress(progress, "images", len(targets))
    if not targets:
        raise EvalError("the dataset has no usable samples")
    _progress(progress, "images", len(targets), final=True)
    return torch.cat(features), targets


@torch.no_grad()
def encode_texts(model, texts, device, batch_size=256, dtype=None):
    """Normalized fp32 text features (N, D) on the CPU."""
    features, progress = [], data.Progress(len(texts))
    for start in range(0, len(texts), batch_size):
        tokens = data.tokenize(texts[start:start + batch_size], context_length=model.config.context_length)
        with autocast(device, dtype):
            t = model.encode_text(tokens.to(device))
        features.append(F.normalize(t.float(), dim=-1).cpu())
        _progress(progress, "texts", min(start + batch_size, len(texts)))
    _progress(progress, "texts", len(texts), final=True)
    return torch.cat(features)


@contextlib.contextmanager
def _eval_mode(model, device):
    """Evaluation mode on the model's device (or `device`); training mode restored after, so this can run
    in the middle of training."""
    was_training = model.training
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    try:
        yield device
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# zero-shot classification


def zeroshot_classifier(model, classnames, templates, device, batch_size=256, dtype=None):
    """(C, D): per class, the mean of its normalized template embeddings, renormalized (CLIP's recipe)."""
    texts = [template.replace("{c}", name) for name in classnames for template in templates]
    t = encode_texts(model, texts, device, batch_size, dtype)  # (C * T, D)
    return F.normalize(t.view(len(classnames), len(templates), -1).mean(1), dim=-1)


def _zeroshot(model, dataset, classnames, templates, batch_size, workers, device, split, dtype=None):
    samples, names, skipped = read_classification(dataset, split, classnames)
    if names is None:
        raise EvalError(f"{dataset}: no class names; put classnames.txt (one per line, in label order) next to "
                        "the shards or pass --classnames FILE")
    templates = load_templates(templates)
    with _eval_mode(model, device) as device:
        w = zeroshot_classifier(model, names, templates, device, batch_size, dtype)  # (C, D)
        x, labels = encode_images(model, samples, device, batch_size, workers,
                                  total=len(samples) if isinstance(samples, list) else None, dtype=dtype)
    labels = torch.tensor(labels)
    if labels.min() < 0 or labels.max() >= len(names):
        raise EvalError(f"{dataset}: labels span {labels.min().item()}..{labels.max().item()} but there are "
                        f"{len(names)} class names")
    logits = ZEROSHOT_LOGIT_SCALE * x @ w.T  # (N, C), fp32: the authors' int() truncation would create ties
    info = {"num_images": len(labels), "num_classes": len(names), "num_templates": len(templates),
            "skipped": dict(skipped)}
    return classification_metrics(logits, labels), info


def zeroshot(model, dataset, *, classnames=None, templates="simple", batch_size=256, workers=0, device=None,
             split=None, dtype=None):
    """Zero-shot top-1/top-5 accuracy and mean per-class recall of model on dataset (a path)."""
    return _zeroshot(model, dataset, classnames, templates, batch_size, workers, device, split, dtype)[0]


# -----------------------------------------------------------------------------
# retrieval


def _retrieval(model, dataset, images, split, prefix, batch_size, workers, device, dtype=None):
    samples, skipped = read_retrieval(dataset, images, split)
    with _eval_mode(model, device) as device:
        x, captions = encode_images(model, samples, device, batch_size, workers,
                                    total=len(samples) if isinstance(samples, list) else None, dtype=dtype)
        texts = [prefix + c for caps in captions for c in caps]
        t = encode_texts(model, texts, device, batch_size, dtype)
    text_to_image = [i for i, caps in enumerate(captions) for _ in caps]
    info = {"num_images": len(x), "num_captions": len(t), "skipped": dict(skipped)}
    return retrieval_metrics(x, t, text_to_image), info


def retrieval(model, dataset, *, images=None, split=None, prefix="", batch_size=256, workers=0, device=None,
              dtype=None):
    """Image->text and text->image R@1/5/10 of model on dataset (a Karpathy JSON or caption shards)."""
    return _retrieval(model, dataset, images, split, prefix, batch_size, workers, device, dtype)[0]


def evaluate_sets(model, zeroshot_set=None, retrieval_set=None, **kw):
    """Zero-shot classification and retrieval on whichever sets are given, as {"TASK/METRIC": value}: what training
    logs at its evaluations."""
    results = {}
    for task, fn, dataset in (("zeroshot", zeroshot, zeroshot_set), ("retrieval", retrieval, retrieval_set)):
        if dataset:
            results.update({f"{task}/{k}": v for k, v in fn(model, dataset, **kw).items()})
    return results


# -----------------------------------------------------------------------------
# linear probe: multinomial logistic regression on frozen features, L2 strength chosen on a validation split


def fit_logistic(x, y, num_classes, l2, max_iter=1000):
    """Minimize mean cross-entropy + l2 * ||W||^2 (bias unpenalized) with full-batch L-BFGS; returns (W, b).
    The problem is convex, so the zero start changes only the time to the optimum, not the optimum."""
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def probe(train_x, train_y, test_x, test_y, num_classes=None, *, val_fraction=0.2, seed=0, max_iter=1000):
    """Choose the L2 strength on a held-out part of train (coarse grid 1e-6..1e2 by decades, then quarter
    decades around the best; ties go to the stronger penalty), refit on all of train, score on test."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    n_val = max(1, round(val_fraction * len(train_x)))
    if len(train_x) - n_val < 1:
        raise EvalError(f"linear probe: {len(train_x)} training samples are too few to hold out a validation split")
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}

    def score(exponent):
        exponent = round(exponent, 2)  # so the fine grid reuses the coarse points exactly
        if exponent not in scores:
            w, b = fit_logistic(train_x[fit], train_y[fit], num_classes, 10.0 ** exponent, max_iter)
            scores[exponent] = classification_metrics(train_x[val] @ w.T + b, train_y[val])["acc1"]
        return scores[exponent]

    def best():  # highest validation accuracy, then the largest penalty
        return max(scores, key=lambda e: (scores[e], e))

    for exponent in range(-6, 3):
        score(exponent)
    center = best()
    for step in range(-3, 4):
        if -6 <= center + step / 4 <= 2:
            score(center + step / 4)
    exponent = best()
    w, b = fit_logistic(train_x, train_y, num_classes, 10.0 ** exponent, max_iter)
    metrics = classification_metrics(test_x @ w.T + b, test_y)
    return {"acc1": metrics["acc1"], "mean_per_class_recall": metrics["mean_per_class_recall"],
            "l2": 10.0 ** exponent, "val_acc1": scores[exponent]}


def _features(model, dataset, split, batch_size, workers, device, dtype):
    samples, _, _ = read_classification(dataset, split if _layout(dataset) == "cifar" else None)
    x, labels = encode_images(model, samples, device, batch_size, workers,
                              total=len(samples) if isinstance(samples, list) else None, dtype=dtype)
    return x, torch.tensor(labels)


def linear_probe(model, train, test, *, batch_size=256, workers=0, device=None, seed=0, dtype=None):
    """Linear-probe acc1 and mean per-class recall: features of train (its "train" split for CIFAR) and
    test (its "test" split), normalized, frozen; the fit runs on the model's device, in fp32."""
    with _eval_mode(model, device) as device:
        train_x, train_y = _features(model, train, "train", batch_size, workers, device, dtype)
        test_x, test_y = _features(model, test, "test", batch_size, workers, device, dtype)
    unseen = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if unseen:  # the probe could never predict them
        raise EvalError(f"linear probe: {test} has {len(unseen)} classes that {train} lacks (e.g. label {unseen[0]}); "
                        "give two splits of one data set, with the same classes")
    result = probe(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), seed=seed)
    result.update(num_train=len(train_x), num_test=len(test_x))
    return result


# -----------------------------------------------------------------------------
# training curves: a run directory's metrics.jsonl drawn with Pillow, several runs overlaid


# Each panel: (title, [(metrics key, legend label)]). A key no record carries is left out of its panel; the
# panels of fractions (UNIT_PANELS) keep the axis 0..1.
PANELS = [
    ("loss", [("loss_raw", "raw-text path"), ("loss_caption", "caption path")]),
    ("loss, every gate weight 1", [("loss_raw_unweighted", "raw-text path"), ("loss_caption_unweighted",
                                                                               "caption path")]),
    ("mean gate weights", [("w_s", "w_s (LCG)"), ("w_t", "w_t (DCG, raw text)"), ("w_c", "w_c (DCG, caption)")]),
    ("running means H", [("H_tc", "H_tc"), ("H_xt", "H_xt"), ("H_xc", "H_xc")]),
    ("logit scale", [("logit_scale", "exp(s)")]),
    ("learning rate", [("lr", "lr")]),
    ("evaluation", [("zeroshot/acc1", "zero-shot top-1"), ("zeroshot/acc5", "zero-shot top-5"),
                    ("retrieval/image_to_text_R@10", "I->T R@10"), ("retrieval/text_to_image_R@10", "T->I R@10")]),
    ("gate quality against the truth", [("truth/lcg_auc", "LCG: AUC of -w_s"), ("truth/dcg_rate", "DCG: w_t < w_c"),
                                        ("truth/loss_auc", "loss: AUC"), ("truth/loss_rate", "loss: raw > caption")]),
    ("mean w_s by truth", [("truth/w_s_clean", "raw text right"), ("truth/w_s_noisy", "raw text wrong")]),
]
UNIT_PANELS = ("evaluation", "gate quality against the truth")
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
DASHES = [None, (10, 6), (3, 4), (14, 4, 3, 4)]  # per run: solid, dashed, dotted, dash-dot
PANEL, LEGEND = (460, 360), 70  # a panel's size and the figure legend's height above the panels, in pixels


def plot_area(n, cols):
    """(left, right, top, bottom) pixels of panel n's plotting area in a figure of `cols` columns."""
    ox, oy = (n % cols) * PANEL[0], LEGEND + (n // cols) * PANEL[1]
    return ox + 70, ox + PANEL[0] - 20, oy + 34, oy + PANEL[1] - 110


def read_metrics(path):
    """metrics.jsonl as a list of dicts; lines that are not a JSON object (a torn last line) are skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
                records.append(r)
    return records


def _series(records, key):  # [(step, value)] of the records holding a finite number under key
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sorted(pts)


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(v)
        v += step
    if ticks[-1] < hi:
        ticks.append(ticks[-1] + step)
    return ticks, step


def _label(v, step):
    """A tick value with as many decimals as the tick step needs."""
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    if digits > 5 or abs(v) >= 1e6:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _dashed(draw, pts, fill, dash, width):
    """A polyline, solid (dash None) or in a dash pattern of on/off lengths in pixels, carried across segments."""
    if dash is None:
        draw.line(pts, fill=fill, width=width, joint="curve")
        return
    pattern, i, left, on = dash, 0, dash[0], True
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            seg = min(left, length - pos)
            if on:
                a, b = pos / length, (pos + seg) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                          fill=fill, width=width)
            pos += seg
            left -= seg
            if left <= 1e-9:
                i = (i + 1) % len(pattern)
                left, on = pattern[i], not on


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the small bitmap font
        return ImageFont.load_default()


def plot_runs(run_dirs, out_path, names=None):
    """Draw the PANELS of each run directory's metrics.jsonl into one PNG at out_path (written atomically):
    one colour per series, one line style per run; panels without data are left out. Returns out_path."""
    runs = []
    for i, d in enumerate(run_dirs):
        path = os.path.join(d, "metrics.jsonl")
        records = read_metrics(path) if os.path.exists(path) else []
        runs.append((names[i] if names else os.path.basename(os.path.normpath(d)) or d, records))
    panels = [(title, [(k, lab) for k, lab in keys if any(_series(r, k) for _, r in runs)]) for title, keys in PANELS]
    panels = [p for p in panels if p[1]] or [("no metrics yet", [])]
    cols = 4 if len(panels) > 4 else len(panels)
    rows = math.ceil(len(panels) / cols)
    pw, ph = PANEL
    img = Image.new("RGB", (cols * pw, rows * ph + LEGEND), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_text, f_small = _font(20), _font(15), _font(13)
    # Figure legend: one dash style per run.
    x = 20
    draw.text((x, 12), "runs:", fill="black", font=f_title)
    x += 70
    for i, (name, records) in enumerate(runs):
        _dashed(draw, [(x, 25), (x + 50, 25)], (60, 60, 60), DASHES[i % len(DASHES)], 3)
        label = f"{name} (to step {max((r['step'] for r in records), default=0)})"
        draw.text((x + 58, 15), label, fill="black", font=f_text)
        x += 58 + draw.textlength(label, font=f_text) + 40
    for n, (title, keys) in enumerate(panels):
        ox, oy = (n % cols) * pw, LEGEND + (n // cols) * ph
        l, r, t, b = plot_area(n, cols)
        draw.text((ox + pw / 2, oy + 6), title, fill="black", font=f_title, anchor="mt")
        all_pts = [p for k, _ in keys for _, rec in runs for p in _series(rec, k)]
        if not all_pts:
            draw.text(((l + r) / 2, (t + b) / 2), "no data", fill="gray", font=f_text, anchor="mm")
            continue
        xs, ys = [p[0] for p in all_pts], [p[1] for p in all_pts]
        xt, xstep = _ticks(min(0, min(xs)), max(xs))
        yt, ystep = _ticks(0.0, 1.0) if title in UNIT_PANELS else _ticks(min(ys), max(ys))
        x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
        px = lambda v: l + (v - x0) / (x1 - x0) * (r - l)
        py = lambda v: b - (v - y0) / (y1 - y0) * (b - t)
        for v in yt:
            draw.line([(l, py(v)), (r, py(v))], fill=(230, 230, 230))
            draw.text((l - 6, py(v)), _label(v, ystep), fill="black", font=f_small, anchor="rm")
        for v in xt:
            draw.line([(px(v), t), (px(v), b)], fill=(230, 230, 230))
            draw.text((px(v), b + 5), _label(v, xstep), fill="black", font=f_small, anchor="ma")
        draw.rectangle([l, t, r, b], outline="black")
        draw.text(((l + r) / 2, b + 24), "step", fill="black", font=f_small, anchor="ma")
        for j, (key, lab) in enumerate(keys):
            colour = COLOURS[j % len(COLOURS)]
            for i, (_, rec) in enumerate(runs):
                pts = [(px(s), py(v)) for s, v in _series(rec, key)]
                if len(pts) > 1:
                    _dashed(draw, pts, colour, DASHES[i % len(DASHES)], 2)
                if len(pts) <= 12:  # sparse series (evaluations): markers, so single points show
                    for x_, y_ in pts:
                        draw.ellipse([x_ - 4, y_ - 4, x_ + 4, y_ + 4], fill=colour if i == 0 else "white",
                                     outline=colour, width=2)
            ly = b + 46 + 18 * (j % 3)
            lx = l + (j // 3) * 190
            draw.line([(lx, ly + 7), (lx + 24, ly + 7)], fill=colour, width=3)
            draw.text((lx + 30, ly), lab, fill="black", font=f_small)
    folder = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError as e:  # makedirs' word for a file where a folder of the path should be
        raise data.UserError(f"cannot write {out_path}: {folder} is a file, not a folder") from e
    except OSError as e:
        raise data.write_error(out_path, e) from e
    with data.atomic_write(out_path) as f:
        img.save(f, "PNG")
    return out_path


# -----------------------------------------------------------------------------
# comparing runs: the last values of each run's metrics, mean ± sd over seeds, one table


REPORT_COLUMNS = [("zeroshot/acc1", "zero-shot top-1"), ("zeroshot/acc5", "top-5"),
                  ("retrieval/image_to_text_R@1", "I->T R@1"), ("retrieval/image_to_text_R@10", "I->T R@10"),
                  ("retrieval/text_to_image_R@1", "T->I R@1"), ("retrieval/text_to_image_R@10", "T->I R@10"),
                  ("truth/lcg_auc", "LCG AUC"), ("truth/dcg_rate", "DCG w_t<w_c"), ("truth/loss_auc", "loss AUC")]


def final_metrics(run_dir):
    """The last value of every key in a run directory's metrics.jsonl."""
    values = {}
    for record in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        values.update(record)
    return values


def _mean_sd(runs, key, scale=1.0, digits=3):
    """'mean ± sd' of key over runs (one run: the value alone; none: '-')."""
    v = [scale * r[key] for r in runs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not v:
        return "-"
    return f"{np.mean(v):.{digits}f}" + (f" ± {np.std(v, ddof=1):.{digits}f}" if len(v) > 1 else "")


def compare_runs(rows):
    """rows: {name: [final_metrics of each seed's run]}, the CLIP baseline first, ALIP second -> a Markdown table
    of REPORT_COLUMNS (mean ± sd over the seeds) and one sentence per gate, as text."""
    def cell(runs, key):
        percent = key.startswith(("zeroshot/", "retrieval/")) or key == "truth/dcg_rate"
        return _mean_sd(runs, key, 100 if percent else 1, 1 if percent else 3)
    lines = [f"| n={len(next(iter(rows.values())))} | " + " | ".join(label for _, label in REPORT_COLUMNS) + " |",
             "|---" * (len(REPORT_COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(runs, key) for key, _ in REPORT_COLUMNS) + " |"
              for name, runs in rows.items()]
    clip, alip = rows.values()
    q = lambda key, runs=alip, digits=3: _mean_sd(runs, "truth/" + key, 1, digits)
    pct = lambda key: _mean_sd(alip, "truth/" + key, 100, 1)
    lines += ["",
              "Zero-shot and retrieval in %, on the clean test split. Gate figures: the last logging window of "
              "training, against the truth the demo data record.",
              f"LCG: mean w_s is {q('w_s_clean')} where the raw text is right and {q('w_s_noisy')} where it is "
              f"wrong; -w_s flags the wrong raw texts with ROC AUC {q('lcg_auc')} (the per-sample raw-text loss "
              f"as a detector: ALIP's {q('loss_auc')}, the CLIP baseline's {q('loss_auc', clip)}).",
              f"DCG: of the {q('dcg_n', digits=0)} samples the LCG flags whose raw text is wrong and caption right, "
              f"{pct('dcg_rate')}% have w_t < w_c, the caption weighted above the raw text (ALIP's per-sample "
              f"losses on the same samples: the raw text's is higher in {pct('loss_rate')}%)."]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# a run's record: metrics.jsonl, and the same records live in TensorBoard or Weights & Biases


REPORTERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # module, pip


def check_reporters(names):
    """--report-to's reporters, each importable; else a UserError that says what to install. Importing them is the
    check: a half-installed package fails here too, not days into a run."""
    for name in names:
        if name not in REPORTERS:
            raise data.UserError(f"--report-to {name}: choose from {', '.join(REPORTERS)} (comma-separated)")
        module, package = REPORTERS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise data.UserError(f"--report-to {name} needs the package {package}: pip install {package} "
                                 f"({type(e).__name__}: {e})") from e


def _scalars(record):
    """The finite numbers of a metrics record, by name; a nested dict (skipped samples by reason) as NAME/KEY."""
    flat = {}
    for key, value in record.items():
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and key != "step":
                flat[key if k is None else f"{key}/{k}"] = v
    return flat


class _TensorBoard:
    def __init__(self, out_dir, step, options, history):
        from torch.utils.tensorboard import SummaryWriter
        # A resumed run hides, from purge_step on, what the run before it logged after its checkpoint (TensorBoard
        # drops those events when it reads the files), and logs those steps anew: one value per step.
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step + 1)

    def log(self, record):
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self, image, step, failed):
        if image:
            self.writer.add_image("curves", np.asarray(Image.open(image).convert("RGB")), step, dataformats="HWC")
        self.writer.close()


class _WandB:
    """One W&B run per --output, continued by every resume. W&B keeps one value per step and refuses a step that
    goes back, so no step shows twice. What a kill cost it (W&B's service writes its buffer every few seconds, and a
    kill -9 loses the rest) is sent again from metrics.jsonl when the run resumes."""

    def __init__(self, out_dir, step, options, history):
        import wandb
        self.state = os.path.join(out_dir, "wandb.json")  # the run's id, and the step it had when it last ended
        previous = data.read_json(self.state) if options["resume"] else None
        try:
            self.run = wandb.init(project=options["project"], name=options["name"], tags=options["tags"] or None,
                                  config=options["config"], dir=out_dir, id=previous and previous["id"],
                                  resume="allow" if previous else None)
        except Exception as e:  # no login, no network: say so now, not after days of training without it
            raise data.UserError(f"--report-to wandb: cannot start a W&B run ({type(e).__name__}: {e}); run `wandb "
                                 "login`, or set WANDB_MODE=offline to write it here and `wandb sync` it later") from e
        # Online, W&B says where its history ends; offline it cannot, and the last clean end is what is known.
        self.floor = max(previous["step"] if previous else 0, self.run.step - 1)
        self._save(self.floor)
        for record in history:  # what W&B may lack of the steps up to the checkpoint this run starts from
            self.log(record)

    def _save(self, step):
        with data.atomic_write(self.state, "w") as f:
            json.dump({"id": self.run.id, "step": step}, f)

    def log(self, record):
        if record["step"] > self.floor:
            self.run.log(_scalars(record), step=record["step"])

    def close(self, image, step, failed):
        import wandb
        if image:
            self.run.log({"curves": wandb.Image(image)}, step=step)
        self.run.finish(exit_code=int(failed))  # writes out W&B's buffer: everything up to `step` is there now
        self._save(step)


class RunLog:
    """Rank 0's record of a run: metrics.jsonl in its folder, one JSON object a line, and each record also to the
    live reporters of report_to ("tensorboard", "wandb"), under the same names at the same steps.

    Opened at `step`, the checkpoint a run resumes from (0 for a new run), it drops the records after that step, which
    are about to be logged again, and a line torn by a kill. A reporter that fails later (network, disk) is dropped
    with one warning: the run goes on. options: W&B's project, name, tags, config, and whether the run resumes.
    """

    def __init__(self, out_dir, step, report_to=(), options=None):
        self.path, self.step = os.path.join(out_dir, "metrics.jsonl"), step
        kept = [r for r in read_metrics(self.path) if r["step"] <= step] if os.path.exists(self.path) else []
        if os.path.exists(self.path):
            with data.atomic_write(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        kinds = {"tensorboard": _TensorBoard, "wandb": _WandB}
        self.reporters = {name: kinds[name](out_dir, step, options or {}, kept) for name in report_to}

    def log(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise data.write_error(self.path, e) from e
        if _scalars(record):  # a warning about a step that was skipped is for metrics.jsonl alone
            self.step = max(self.step, record["step"])
            self._each("log", record)

    def evaluated(self, step, zeroshot_set=None, retrieval_set=None):
        """Whether the records hold, at `step`, an evaluation on each set given (a resumed run that had finished)."""
        records = [r for r in read_metrics(self.path) if r["step"] == step] if os.path.exists(self.path) else []
        wanted = [task for task, dataset in (("zeroshot/", zeroshot_set), ("retrieval/", retrieval_set)) if dataset]
        return all(any(k.startswith(task) for r in records for k in r) for task in wanted)

    def close(self, image=None, failed=False):
        """End the reporters, sending them `image` (the curves' PNG) at the last step; `failed`: the run ended by
        an error."""
        self._each("close", image, self.step, failed)

    def _each(self, method, *args):
        for name, reporter in list(self.reporters.items()):
            try:
                getattr(reporter, method)(*args)
            except Exception as e:  # whatever a reporter's network or disk raises: the training matters more
                del self.reporters[name]
                print(f"warning: --report-to {name} failed ({type(e).__name__}: {e}); the run goes on without it",
                      file=sys.stderr)


# -----------------------------------------------------------------------------
# export: the model in open_clip's and Hugging Face's formats, for the code that uses CLIP models


EXPORT_FORMATS = ("open_clip", "hf")
OPEN_CLIP_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")  # presets open_clip ships, each with a "-quickgelu" twin


def open_clip_name(cfg, presets):
    """The name open_clip builds cfg's architecture by (presets: alip's, which are named as open_clip names them), or
    None for one it does not ship."""
    for name in OPEN_CLIP_MODELS:
        if dataclasses.replace(presets[name], quick_gelu=cfg.quick_gelu) == cfg:
            return name + ("-quickgelu" if cfg.quick_gelu else "")
    return None


def open_clip_config(cfg):
    """cfg in the layout of open_clip's model_configs/*.json; what it leaves out has open_clip's defaults, which are
    ours (MLP ratio 4, layer-norm eps 1e-5, class-token and argmax pooling, no biases on the projections)."""
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu,
            "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
                           "head_width": cfg.vision_width // cfg.vision_heads, "patch_size": cfg.patch_size},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                         "heads": cfg.text_heads, "layers": cfg.text_layers}}


def export_open_clip(model, out, presets):
    """Write model's weights at out as a bare state dict: our parameter names are open_clip's, so
    open_clip.create_model(NAME, pretrained=out) loads it, and so does the ALIP authors' zero_shot.py. An architecture
    that open_clip does not ship gets its config beside out, named for out's stem (open_clip registers a config file
    under its stem). Returns (NAME, the config's path or None)."""
    name, config = open_clip_name(model.config, presets), None
    if name is None:
        stem = os.path.splitext(out)[0]
        name, config = os.path.basename(stem), stem + ".json"
        if config == out:
            raise data.UserError(f"--out {out}: that is the name of the open_clip config written beside the weights; "
                                 "give the weights another extension (.pt)")
    with data.atomic_write(out) as f:
        torch.save(dict(model.state_dict()), f)
    if config:
        with data.atomic_write(config, "w") as f:
            json.dump(open_clip_config(model.config), f, indent=1)
    return name, config


_HF_NAMES = {  # ours -> transformers' CLIPModel, outside the transformer blocks
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text_projection": "text_projection.weight",
    **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                                                          ("visual.ln_post", "vision_model.post_layernorm"),
                                                          ("ln_final", "text_model.final_layer_norm"))
       for p in ("weight", "bias")},
}
_HF_TRANSPOSED = ("visual.proj", "text_projection")  # we apply them as x @ P, nn.Linear as x @ W.T
_HF_BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def hf_state_dict(sd):
    """Our state dict in transformers' CLIPModel names, the projections transposed and the attention's packed input
    projection split into its q, k and v parts."""
    out = {}
    for key, value in sd.items():
        block = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if block is None:
            out[_HF_NAMES[key]] = value.T if key in _HF_TRANSPOSED else value
            continue
        layer = f"{'vision' if block[1] else 'text'}_model.encoder.layers.{block[2]}."
        if block[3].startswith("attn.in_proj_"):  # (3W, ...): q, k, v stacked, as nn.MultiheadAttention packs them
            param = block[3].removeprefix("attn.in_proj_")
            out.update({f"{layer}self_attn.{qkv}_proj.{param}": part for qkv, part in zip("qkv", value.chunk(3))})
        else:
            module, param = block[3].rsplit(".", 1)
            out[f"{layer}{_HF_BLOCK[module]}.{param}"] = value
    return out


def hf_config(transformers, model):
    """transformers' CLIPConfig of model: its activation ("gelu" is transformers' name for the exact, erf GELU
    of nn.GELU) and layer-norm eps (nn.LayerNorm's default, in every norm of ours); the text tower pools at the
    first EOT token, where our argmax of the token ids finds it."""
    cfg = model.config
    common = dict(hidden_act="quick_gelu" if cfg.quick_gelu else "gelu", layer_norm_eps=model.ln_final.eps,
                  projection_dim=cfg.embed_dim)
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, bos_token_id=data.SOT, eos_token_id=data.EOT,
                pad_token_id=data.EOT, **common)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, **common)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                                   logit_scale_init_value=model.logit_scale.item())


def hf_processor(transformers, cfg):
    """A CLIPProcessor with our tokenizer's vocabulary and merges, and our eval_transform's image preprocessing
    (on the PIL backend). Its tokenizer pads with EOT where ours pads with id 0 ("!"): a pad token is also split
    out of the text, so "!" as the pad token would turn every "!" in a caption into padding."""
    encoder, ranks = data.bpe_vocab()
    token = {i: t for t, i in encoder.items()}
    tokenizer = transformers.CLIPTokenizer(vocab=encoder, merges=list(ranks), bos_token=token[data.SOT],
                                           eos_token=token[data.EOT], unk_token=token[data.EOT],
                                           pad_token=token[data.EOT], model_max_length=cfg.context_length)
    size = cfg.image_size
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                resample=Image.BICUBIC, image_mean=list(data.MEAN),
                                                image_std=list(data.STD))
    return transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def _transformers():
    """transformers, for --format hf: its absence is a line that names this command."""
    try:
        return data.import_transformers()
    except data.UserError as e:
        if isinstance(e.__cause__, ModuleNotFoundError) and e.__cause__.name == "transformers":
            raise data.UserError("--format hf needs the transformers package, which is not installed: pip install "
                                 "transformers (--format open_clip needs nothing more)") from e
        raise


def export_hf(model, out):
    """Write model, fp32, and its processor as a folder that transformers' CLIPModel.from_pretrained and
    CLIPProcessor.from_pretrained load. The folder is written beside out and renamed into place, so out is whole
    or absent; an existing out must be an empty folder."""
    transformers = _transformers()
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise data.UserError(f"--out {out} exists and is not an empty folder; remove it or choose another --out")
    hf = transformers.CLIPModel(hf_config(transformers, model)).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict()))  # strict: every weight of theirs from one of ours
    processor = hf_processor(transformers, model.config)
    from safetensors import SafetensorError  # transformers' weight format; its writer's errors are not OSErrors
    tmp = data.temp_beside(out)
    try:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        data.swap_in(tmp, out)
    except OSError as e:
        raise data.write_error(out, e, "--out") from e
    except SafetensorError as e:  # a full disk or a quota while the weights are written
        raise data.UserError(f"--out: cannot write {out}: {e}; check the space and quota there") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(model, fmt, out, presets):
    """Write model at out in format fmt (one of EXPORT_FORMATS) and print the lines that load it there."""
    if fmt == "open_clip":
        name, config = export_open_clip(model, out, presets)
        if config is None:
            print(f"wrote {out}: fp32 weights of open_clip's {name}. In open_clip:")
        else:
            print(f"wrote {out} (fp32 weights) and {config} (their architecture, named {name!r} in open_clip). "
                  "In open_clip:")
            print(f"  open_clip.add_model_config({config!r})")
        print(f"  model = open_clip.create_model({name!r}, pretrained={out!r})")
    else:
        export_hf(model, out)
        print(f"wrote {out}: a CLIPModel (fp32) and its CLIPProcessor. In transformers:")
        print(f"  model = CLIPModel.from_pretrained({out!r})")
        print(f"  processor = CLIPProcessor.from_pretrained({out!r}, backend='pil')")


# -----------------------------------------------------------------------------
# command line


def _load_model(args, load_model):
    """The model of args.checkpoint on the CPU (the evaluations move it to --device)."""
    named = "" if args.command == "export" else "--checkpoint "  # export's is its argument
    if not os.path.exists(args.checkpoint):
        raise EvalError(f"{named}{args.checkpoint}: no such file or directory; pass a run directory, a "
                        "ckpt-*.pt file, or a CLIP state dict (with --model NAME)")
    try:
        return load_model(args.checkpoint, args.model, args.quick_gelu, args.head_width)
    except data.UserError as e:  # names the file and what is wrong with it
        raise EvalError(f"{named}{e}") from e
    except (KeyError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise EvalError(f"{named}{args.checkpoint}: cannot load it ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0]}); for a bare state dict pass --model (e.g. ViT-B-32), "
                        "and --quick-gelu for OpenAI's weights") from e


def _report(title, metrics, info, as_json):
    table = sys.stderr if as_json else sys.stdout  # with --json, stdout holds the JSON object alone
    print(title, file=table)
    for key, value in info.items():
        print(f"  {key:<24} {value}", file=table)
    for key, value in metrics.items():
        shown = f"{value:.3g}" if key == "l2" else f"{100 * value:6.2f}"  # fractions shown as percentages
        print(f"  {key:<24} {shown}", file=table)
    if as_json:  # NaN (acc5 with < 5 classes) is not JSON: null
        out = {**info, **metrics}
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}))


def main(argv=None, *, load_model, presets):
    """The command line; load_model(path, name, quick_gelu, head_width) and the presets are alip's."""
    parser = data.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    weights = data.ArgumentParser(add_help=False)
    weights.add_argument("--model", default=None, help="architecture of a bare state dict, e.g. ViT-B-32 (default: "
                         "read off its shapes)")
    weights.add_argument("--quick-gelu", action="store_true", help="QuickGELU activations (OpenAI's weights)")
    weights.add_argument("--head-width", type=data.positive_int,
                         help="attention head width of a bare state dict (default: its preset's heads, read off its "
                              "shapes; 64 where no preset has them, as in OpenAI's CLIPs)")
    weights.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    common = data.ArgumentParser(add_help=False, parents=[weights])
    common.add_argument("--checkpoint", required=True, help="run directory, ckpt-*.pt, or a CLIP state dict")
    common.add_argument("--batch-size", type=data.positive_int, default=256, help="images or texts per forward pass")
    common.add_argument("--workers", type=data.nonnegative_int, default=4, help="image-decoding threads")
    common.add_argument("--device", default="auto", help="auto (CUDA where torch sees it), cpu, cuda or cuda:N")
    common.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast of the forward passes: fp32 is the ALIP authors' protocol; bf16 and fp16 are "
                        "faster on a GPU and move the features by their rounding")
    common.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")

    p = commands.add_parser("zeroshot", parents=[common], help="zero-shot classification")
    p.add_argument("--dataset", required=True, help="ImageFolder, CIFAR python directory, or shards with .cls")
    p.add_argument("--split", help="CIFAR split (default: test); other layouts: the path is the split")
    p.add_argument("--classnames", default=None,
                   help='file with one class name per line, or "imagenet" (default: classnames.txt beside the shards, '
                        "CIFAR's own, or the ImageFolder's folder names)")
    p.add_argument("--templates", default="openai_imagenet",
                   help='"openai_imagenet" (80), "cifar" (18), "simple" (7), or a file with one {c} template per line')

    p = commands.add_parser("retrieval", parents=[common], help="image-text retrieval")
    p.add_argument("--dataset", required=True, help="Karpathy-split .json or shards with .txt captions")
    p.add_argument("--images", default=None, help="image folder of a Karpathy JSON (default: the JSON's folder)")
    p.add_argument("--split", help="Karpathy split (default: test); shards: the path is the split")
    p.add_argument("--caption-prefix", default="", help='e.g. "a photo of "; none by default, as in the paper')

    p = commands.add_parser("linear-probe", parents=[common], help="logistic regression on frozen features")
    p.add_argument("--train", required=True, help="training set (CIFAR: its train split)")
    p.add_argument("--test", required=True, help="test set (CIFAR: its test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")

    p = commands.add_parser("plot", help="training curves of run directories (also running ones), overlaid")
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: RUN/curves.png for one run, else curves.png beside them)")

    p = commands.add_parser("export", parents=[weights], help="the model in open_clip's or Hugging Face's format")
    p.add_argument("checkpoint", help="run directory (its latest checkpoint), ckpt-*.pt, or a CLIP state dict")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="open_clip: a state dict file, which the ALIP authors' zero_shot.py loads too; hf: a folder "
                   "for transformers' CLIPModel and CLIPProcessor")
    p.add_argument("--out", required=True, help="open_clip: the file to write (an existing one is replaced); hf: the "
                   "folder, which must be absent or empty (it is written beside, then renamed into place)")
    args = parser.parse_args(argv)
    if args.command == "plot":
        out = args.out or os.path.join(args.runs[0] if len(args.runs) == 1 else os.path.dirname(
            os.path.commonpath([os.path.abspath(r) for r in args.runs]) + os.sep), "curves.png")
        missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "metrics.jsonl"))]
        if missing:
            raise EvalError(f"no metrics.jsonl in {', '.join(missing)}: pass run directories (alip.py's --output)")
        print(plot_runs(args.runs, out))
        return

    model = _load_model(args, load_model)
    if args.command == "export":
        export(model, args.format, args.out, presets)
        return
    compute = data.choose_compute(args.device, args.precision)
    common_kw = dict(batch_size=args.batch_size, workers=args.workers, device=compute.device, dtype=compute.amp)
    if args.command == "zeroshot":
        metrics, info = _zeroshot(model, args.dataset, args.classnames, args.templates, split=args.split,
                                  **common_kw)
        title, info = f"zero-shot {args.dataset}", {"dataset": args.dataset, "templates": args.templates, **info}
    elif args.command == "retrieval":
        metrics, info = _retrieval(model, args.dataset, args.images, args.split, args.caption_prefix, **common_kw)
        title, info = f"retrieval {args.dataset}", {"dataset": args.dataset, **info}
    else:
        metrics = linear_probe(model, args.train, args.test, seed=args.seed, **common_kw)
        info = {"train": args.train, "test": args.test,
                "num_train": metrics.pop("num_train"), "num_test": metrics.pop("num_test")}
        title = f"linear probe {args.train} -> {args.test}"
    _report(title, metrics, {"task": args.command, "checkpoint": args.checkpoint, "precision": args.precision, **info},
            args.json)


if __name__ == "__main__":
    # The one place that names alip: eval.py's functions take any model with encode_image / encode_text and
    # alip.py trains with them, so only this command line, above both, hands eval our loader and presets.
    import alip
    data.run_command(lambda argv: main(argv, load_model=alip.load_model, presets=alip.PRESETS))
