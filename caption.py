"""
caption.py: stage one of ALIP. A captioner writes a synthetic caption for every image of the shards, offline, into
the JSONL side file that stage two (alip.py --captions) reads: {"key": KEY, "caption": TEXT} per line.

    python caption.py 'shards/{00000..01999}.tar' --out caps.jsonl                      # one GPU (or the CPU)
    torchrun --standalone --nproc_per_node=8 caption.py 'shards/*.tar' --out caps.jsonl # every GPU of a node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 caption.py ...
    python caption.py --bench --random blip --batch-size 64 256     # captions/s of a BLIP-base-sized captioner

The paper captions with OFA-base, which transformers does not have; the default is BLIP's ViT-B captioner, a
COCO-style captioner of about its size (README: "Stage one"). Any folder or Hugging Face model id that transformers'
AutoProcessor and AutoModelForImageTextToText load works (BLIP, BLIP-2, GIT, Florence-2).

Guarantees:
- Every usable image gets one caption, its key once: a key that another sample holds already is skipped and counted
  as duplicate_key, as are images the training loader would skip (by the same reasons) and captions that come out
  empty (empty_caption). The summary gives the counts.
- Killed at any point (kill -9, a lost node, a scheduler's preemption), the same command continues where it stopped.
  Progress lives in OUT.parts/ beside OUT: per shard, the captions written so far (appended, one line each) and, once
  the shard is finished, a marker with its counts. OUT itself is written once, from them, when every shard is done.
  The number of processes may change between runs: the shards still to do are shared among whoever runs.
- One captions file comes from one captioner and one set of settings: a run that would continue another's progress
  with other settings is refused in one line. The captioner is pinned by what it is (its config and a digest of its
  weights), not by the folder or model id it was loaded from.
- One job per captions file at a time: rank 0 holds OUT.parts/'s lock, which ends with its process however it ends
  (its loader workers do not hold it), so a killed job's command, given again at once, continues.
- A loader worker that a signal ends (the out-of-memory killer) is one line naming it and what to lower, and shards
  in which not one image can be captioned write nothing: both exit with status 2, as bad input does.
"""
import collections
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from PIL import Image

import data

# -----------------------------------------------------------------------------
# settings

# The closest stand-in in transformers for the paper's OFA-base (OFA is not in it): BLIP's ViT-B captioner, a
# COCO-style captioner of about OFA-base's size (224M parameters against 180M). README: "Stage one" says why.
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
# The prompt a model kind continues when --prompt is not given, by transformers model type. BLIP's captioner was
# fine-tuned on COCO behind "a picture of " and its authors decode with it (the echo is dropped); Florence-2 takes its
# task token. Others (GIT, BLIP-2) caption unprompted.
DEFAULT_PROMPTS = {"blip": "a picture of", "florence2": "<CAPTION>"}
SYNC_SECONDS = 30  # progress files are fsynced this often: what a lost node may cost, captions redone
# A rank that has finished waits for the others: up to this long, which only a rank that hangs without dying reaches.
TIMEOUT = timedelta(hours=12)
SETTING_FLAGS = {"prompt": "--prompt", "max_new_tokens": "--max-new-tokens", "num_beams": "--num-beams",
                 "precision": "--precision", "shards": "SHARDS"}
# Config fields that say where a model lies, which transformers wrote it, or the dtype it was loaded in (which
# --precision pins): not what the model is.
NOT_THE_MODEL = {"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "_from_model_config"}

# -----------------------------------------------------------------------------
# the captioner


def load_captioner(name, device, dtype):
    """(processor, model, identity): a folder or Hugging Face model id that AutoProcessor and
    AutoModelForImageTextToText load, the model in eval mode on device with weights in dtype; identity: what the
    captioner is, wherever it lies (captioner_identity). A model id comes from the local Hugging Face cache alone where
    the hub cannot be reached."""
    transformers = data.import_transformers()
    from huggingface_hub import constants, errors, utils  # installed with transformers
    cache_only, unreachable = {}, None
    if not os.path.isdir(name):
        try:
            utils.validate_repo_id(name)
        except errors.HFValidationError as e:
            raise data.UserError(f"--captioner {name}: no such folder, nor a Hugging Face model id (NAME or "
                                 "ORG/NAME)") from e
        unreachable = _hub_unreachable(name)
        if unreachable:  # at once: huggingface_hub retries every file missing from the cache, for minutes in all
            cache_only = {"local_files_only": True}
    try:
        # Pillow's image processing: the same pixels whether or not torchvision is installed.
        processor = transformers.AutoProcessor.from_pretrained(name, backend="pil", **cache_only)
        # Without Hugging Face's hub kernels, which transformers would fetch and swap in where that package is
        # installed: captions must not depend on what a host happens to have.
        model = transformers.AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, use_kernels=False,
                                                                         **cache_only)
    except Exception as e:  # whatever transformers raises for a folder or id that is not a captioner
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if cache_only:
            raise data.UserError(
                f"--captioner {name}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), "
                f"and the hub cannot be reached ({unreachable}); where there is a network, `hf download {name}` puts "
                "it in the cache (then copy the cache here, or point HF_HOME at it), or pass a folder it was saved "
                "to (README: Stage one, offline)") from e
        raise data.UserError(f"--captioner {name}: does not load ({type(e).__name__}: {first}); it must be a folder "
                             "or a Hugging Face model id that transformers' AutoProcessor and "
                             "AutoModelForImageTextToText load") from e
    if getattr(processor, "image_processor", None) is None:
        raise data.UserError(f"--captioner {name}: its processor has no image processor")
    if cache_only and not constants.HF_HUB_OFFLINE and int(os.environ.get("RANK", 0)) == 0:
        print(f"caption: the Hugging Face hub cannot be reached ({unreachable}): {name} loaded from the local cache "
              "as it is there", file=sys.stderr)
    identity = captioner_identity(model)  # on the CPU, where the weights were loaded
    return processor, model.to(device).eval(), identity


def _hub_unreachable(name):
    """Why the Hugging Face hub gives no answer for model id `name`, in a few words; None where it answers (the model,
    or that there is none such). One request, not retried: whether the hub is there at all."""
    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except errors.HfHubHTTPError:  # an answer (no such model, a gated one): from_pretrained says what
        return None
    except Exception as e:  # no answer, whatever the HTTP client calls it: no network, DNS, a proxy, a timeout
        return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]
    return None


def _strip(config):
    if isinstance(config, dict):
        return {k: _strip(v) for k, v in config.items() if k not in NOT_THE_MODEL}
    return config


def captioner_identity(model):
    """{"config", "weights"}: the model's config and generation config as its folder's config.json and
    generation_config.json give them (less NOT_THE_MODEL's fields), and the SHA-256 of its state dict as loaded (each
    tensor's name, dtype, shape and bytes, in order). Two folders that hold the same captioner have the same identity;
    new weights at the same path have another. The digest reads every weight once: for BLIP-base (224M parameters),
    0.8-1.0 s in fp32 and 0.4-0.5 s in bf16 on one core of the 2-core dev box (2026-12-07)."""
    config = {"model": model.config.to_diff_dict(), "generation": model.generation_config.to_diff_dict()}
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.detach().reshape(-1).view(torch.uint8).numpy())  # the bytes as they lie: no copy
    # through JSON, as settings.json keeps it: integer keys (id2label) become strings
    return {"config": json.loads(json.dumps(_strip(config))), "weights": digest.hexdigest()}


def prompt_inputs(processor, prompt):
    """The model inputs that come from the prompt, (1, L) each: what the processor gives for an image and the prompt,
    less what its image processor gives for the image alone."""
    dummy = Image.new("RGB", (64, 64))
    image_keys = set(processor.image_processor([dummy], return_tensors="pt"))
    both = processor(images=[dummy], text=[prompt] if prompt else None, return_tensors="pt")
    return {k: v for k, v in both.items() if k not in image_keys}


def clean_caption(text, prompt):
    """One line: whitespace collapsed, and the prompt dropped where the model repeats it (BLIP does)."""
    text, prompt = " ".join(text.split()), " ".join((prompt or "").split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].strip()
    return text


def generate_ids(model, images, text_inputs, max_new_tokens, num_beams, min_new_tokens=None):
    """Token ids for one batch of preprocessed images ({name: (B, ...)}, as the image processor returns them), greedy
    when num_beams is 1; the prompt's inputs (1, L) are repeated for every image."""
    n = len(next(iter(images.values())))
    inputs = {k: v.to(model.device, non_blocking=True) for k, v in images.items()}
    inputs.update({k: v.repeat(n, *[1] * (v.dim() - 1)).to(model.device) for k, v in text_inputs.items()})
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              min_new_tokens=min_new_tokens)


def image_min_side(image_processor):
    """The side both sides of a decoded JPEG keep at least (decode_image's draft scaling): the processor's largest
    target side, so that it only ever scales down. 0 (full decoding) when its size is not given in pixels."""
    size = getattr(image_processor, "size", None)  # a dict, or transformers' SizeDict, or one number
    if isinstance(size, int):
        return size
    sides = [size.get(k) if isinstance(size, dict) else getattr(size, k, None)
             for k in ("height", "width", "shortest_edge")]
    return max((s for s in sides if isinstance(s, int)), default=0)


# -----------------------------------------------------------------------------
# the images: read, decoded and preprocessed by the loader's workers


class _CaptionImages(torch.utils.data.IterableDataset):
    """What the loader's workers do: read whole shards, decode and preprocess their images, hand over batches. One
    worker reads each shard, in order, so that the shard's progress file is appended in order; a shard's counts
    travel with the batch that holds its last image."""

    def __init__(self, shards, todo, captioned, image_processor, batch_size, dtype, first_holder):
        self.shards, self.todo, self.captioned, self.first_holder = shards, todo, captioned, first_holder
        self.image_processor, self.min_side = image_processor, image_min_side(image_processor)
        self.batch_size, self.dtype = batch_size, dtype

    def _images(self, i, record):
        """(key, image) for each sample of shard i not captioned yet; the others are counted in record."""
        done, skipped = self.captioned.get(i, ()), record["skipped"]
        for sample in data.iter_samples([self.shards[i]], skipped, first_holder=self.first_holder):
            key = sample["__key__"]
            record["samples"] += 1
            if sample.get("__duplicate__"):  # the training loader skips it too: one caption would serve both
                skipped["duplicate_key"] += 1
                continue
            if key in done:
                record["resumed"] += 1
                continue
            image_ext = next((e for e in data.IMAGE_EXTS if e in sample), None)
            if image_ext is None:
                skipped["missing_image"] += 1
                continue
            try:
                image = data.decode_image(sample[image_ext], self.min_side)
            except ValueError as e:  # the reasons the training loader counts
                skipped[str(e)] += 1
                continue
            yield key, image

    def _batch(self, items, finished, records):
        images = {}
        if items:
            out = self.image_processor([image for _, _, image in items], return_tensors="pt")
            # Sent in the model's dtype: bf16 halves what crosses between processes.
            images = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in out.items()}
        progress = {n: sum(r[n] for r in records) for n in ("samples", "resumed")}
        progress["skipped"] = sum(sum(r["skipped"].values()) for r in records)
        return {"shards": [i for i, _, _ in items], "keys": [k for _, k, _ in items], "images": images,
                "finished": finished, "progress": progress}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info else (0, 1)
        items, finished, records = [], [], []
        for i in self.todo[wid::n_workers]:
            record = {"shard": self.shards[i], "samples": 0, "resumed": 0, "skipped": collections.Counter()}
            records.append(record)
            for key, image in self._images(i, record):
                items.append((i, key, image))
                if len(items) == self.batch_size:
                    yield {"worker": wid, **self._batch(items, finished, records)}
                    items, finished = [], []
            finished.append((i, {**record, "skipped": dict(record["skipped"])}))
        yield {"worker": wid, **self._batch(items, finished, records)}


# -----------------------------------------------------------------------------
# progress files: OUT.parts/NNNNN.jsonl (the captions so far) and NNNNN.done (a finished shard's counts)


def _part(parts, i, ext):
    return os.path.join(parts, f"{i:05d}.{ext}")  # shard i of the run's list: names need not be unique across sources


def read_part(path):
    """The keys of a progress file's whole lines. A torn or unreadable tail (a write cut off by a kill or a lost node)
    is cut off the file, so that appending goes on after the last whole line and its captions are made again."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise data.UserError(f"cannot read {path}: {e.strerror}") from e
    keys, whole = [], 0
    for line in raw.split(b"\n")[:-1]:  # after a whole last line the last piece is b""; else it is the torn one
        try:
            row = json.loads(line)
            key, _ = row["key"], row["caption"]
        except (ValueError, KeyError, TypeError):
            break
        keys.append(str(key))
        whole += len(line) + 1
    if whole < len(raw):
        try:
            with open(path, "r+b") as f:
                f.truncate(whole)
        except OSError as e:
            raise data.write_error(path, e) from e
    return keys


class _PartWriter:
    """Appends captions to the progress files of the shards being captioned, and marks a shard done once its file is
    on disk. Written data reach the OS after every batch, so a killed process loses none of them; an fsync every
    SYNC_SECONDS bounds what a lost node loses."""

    def __init__(self, parts, lines):
        self.parts, self.lines, self.files, self.synced = parts, lines, {}, time.monotonic()

    def _open(self, i):
        path = _part(self.parts, i, "jsonl")
        try:
            self.files[i] = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise data.write_error(path, e) from e
        return self.files[i]

    def add(self, i, key, caption):
        f = self.files.get(i) or self._open(i)
        try:
            f.write(json.dumps({"key": key, "caption": caption}) + "\n")
        except OSError as e:
            raise data.write_error(f.name, e) from e
        self.lines[i] += 1

    def _flush(self, f, sync):
        try:
            f.flush()
            if sync:
                os.fsync(f.fileno())
        except OSError as e:
            raise data.write_error(f.name, e) from e

    def flush(self):
        sync = time.monotonic() - self.synced > SYNC_SECONDS
        for f in self.files.values():
            self._flush(f, sync)
        if sync:
            self.synced = time.monotonic()

    def finish(self, i, record):
        if i not in self.files and self.lines[i]:  # all captioned by a run that was killed: on disk before the marker
            self._open(i)
        f = self.files.pop(i, None)
        if f is not None:
            self._flush(f, True)
            f.close()
        with data.atomic_write(_part(self.parts, i, "done"), "w") as marker:
            json.dump({**record, "captions": self.lines[i]}, marker)

    def close(self):
        for f in self.files.values():
            with contextlib.suppress(OSError):  # closing after a failed write: that error is the one to report
                f.close()


def _first_difference(was, now, name=""):
    """(dotted field name, value in was, value in now) of the first field where two configs differ."""
    if isinstance(was, dict) and isinstance(now, dict):
        for k in [*was, *(k for k in now if k not in was)]:
            if k not in was or k not in now:
                return name + k, was.get(k, "absent"), now.get(k, "absent")
            if was[k] != now[k]:
                return _first_difference(was[k], now[k], name + k + ".")
    return name.rstrip("."), was, now


def _check_settings(parts, settings):
    """(write, note): whether settings.json is to be written (a new progress folder, or one of an earlier caption.py
    that pinned less), and a line to say so or None. A data.UserError if the folder holds a run made with other
    settings or by another captioner."""
    if not os.path.isdir(parts):
        return True, None
    there = data.read_json(os.path.join(parts, "settings.json"))
    if not isinstance(there, dict):
        if any(name.endswith((".jsonl", ".done")) for name in os.listdir(parts)):
            raise data.UserError(f"{parts} holds captions but no readable settings.json, so what made them is unknown; "
                            "remove the folder to start over")
        return True, None
    one = (f"One captions file comes from one captioner and one set of settings: pass what that run used, or remove "
           f"{parts} to start over")
    # An earlier caption.py pinned the captioner's folder path or model id alone. Its run is continued where this one
    # loads from the same place, as it would have been: refusing would throw its captions away for a doubt that its
    # own rerun would not have raised. The captioner found there now is pinned from here on.
    earlier = "captioner_weights" not in there
    if earlier and there.get("captioner") != settings["captioner"]:
        raise data.UserError(f"{parts} holds an unfinished run made with --captioner {there.get('captioner')!r}; this "
                             f"command has {settings['captioner']!r}. {one}")
    if not earlier and there.get("captioner_config") != settings["captioner_config"]:
        field, was, now = _first_difference(there.get("captioner_config"), settings["captioner_config"])
        raise data.UserError(f"{parts} holds an unfinished run made by another captioner ({there.get('captioner')!r}, "
                             f"whose config has {field} {was!r}; --captioner {settings['captioner']!r} has {now!r}). "
                             f"{one}")
    for name, flag in SETTING_FLAGS.items():
        was, now = there.get(name), settings[name]
        if was == now:
            continue
        if name == "shards":
            was, now = (f"{len(s)} shards ({s[0]} ... {s[-1]})" if s else "no shards" for s in (was or [], now))
        else:
            was, now = repr(was), repr(now)
        raise data.UserError(f"{parts} holds an unfinished run made with {flag} {was}; this command has {now}. One "
                             f"captions file comes from one captioner and one set of settings: pass {flag} {was} to "
                             f"continue that run, or remove {parts} to start over")
    if earlier:
        return True, (f"{parts}: made by an earlier caption.py, which pinned only where its captioner lay: taken to be "
                      f"the captioner at {settings['captioner']} now, whose config and weights are pinned from here on")
    if there["captioner_weights"] != settings["captioner_weights"]:
        raise data.UserError(f"{parts} holds an unfinished run made by a captioner with other weights (SHA-256 "
                             f"{there['captioner_weights'][:16]}..., loaded from {there.get('captioner')!r}) than "
                             f"--captioner {settings['captioner']!r} ({settings['captioner_weights'][:16]}...). {one}")
    return False, None


def _assemble(shards, parts, out):
    """Write `out` from the progress files of a finished run, in the order of the shards and of their samples (each key
    once: the readers skipped the later holders of a key); the counts over all of them."""
    skipped, n = collections.Counter(), 0
    with data.atomic_write(out) as f:
        for i, shard in enumerate(shards):
            marker, path = _part(parts, i, "done"), _part(parts, i, "jsonl")
            record = data.read_json(marker)
            if not isinstance(record, dict):
                raise data.UserError(f"{marker}: unreadable; remove it to caption {shard} again")
            skipped.update(record.get("skipped", {}))
            lines = 0
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as part:
                for lines, line in enumerate(part, 1):
                    try:
                        json.loads(line)["key"]
                    except (ValueError, KeyError, TypeError) as e:
                        raise data.UserError(f"{path}, line {lines}: damaged; remove it and {marker} to caption "
                                             f"{shard} again") from e
                    f.write(line)
                    n += 1
            if lines != record.get("captions"):
                raise data.UserError(f"{path} holds {lines} captions, {marker} says {record.get('captions')}: remove "
                                     f"both to caption {shard} again")
        if n == 0:  # an empty captions file would train nothing
            raise data.UserError(f"not one image of the {len(shards)} shards could be captioned (skipped: "
                                 f"{dict(skipped) or 'none: the shards hold no samples'}); nothing is written to {out}")
    return {"captions": n, "skipped": dict(skipped)}


# -----------------------------------------------------------------------------
# the job: every rank captions its share of the shards still to do; rank 0 writes OUT


def caption(spec, out, captioner=DEFAULT_CAPTIONER, prompt=None, max_new_tokens=20, num_beams=1, batch_size=64,
            precision="auto", device="auto", workers=None):
    """Stage one: a caption for every usable image of the shards, written to `out` as JSONL {"key", "caption"}, by
    one process or by every rank under torchrun, each captioning its share of the shards. Killed at any point, the
    same call continues where it stopped (see this file's docstring). workers: loader processes per rank (default:
    the node's CPU cores shared among its ranks, at most 8). Returns the summary on rank 0 ({"out", "nothing_to_do":
    True} when `out` exists with no run under way); None on the other ranks."""
    shards = data.find_shards(spec)
    parts = out + ".parts"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if os.path.isdir(out):
        raise data.UserError(f"--out {out}: a folder; --out names the captions file to write, e.g. "
                             f"{os.path.join(out, 'caps.jsonl')}")
    if os.path.exists(out) and not os.path.isdir(parts):
        if rank == 0:
            print(f"{out} exists and no captioning into it is under way ({parts}/ is absent): nothing to do. To "
                  "caption again, remove it or choose another --out", file=sys.stderr)
        return {"out": out, "nothing_to_do": True} if rank == 0 else None
    compute = data.choose_compute(device, precision)
    processor, model, identity = load_captioner(captioner, compute.device, compute.dtype)
    if prompt is None:
        prompt = DEFAULT_PROMPTS.get(model.config.model_type, "")
    # The captioner is pinned by what it is (its identity); where it was loaded from is kept to name it in messages.
    settings = {"captioner": os.path.abspath(captioner) if os.path.isdir(captioner) else captioner,
                "captioner_config": identity["config"], "captioner_weights": identity["weights"], "prompt": prompt,
                "max_new_tokens": max_new_tokens, "num_beams": num_beams, "precision": compute.precision,
                "shards": [os.path.basename(s) for s in shards]}
    lock = data.lock_directory(parts, "--out") if rank == 0 else None  # one job per file, once the input is good
    if lock:  # the captions file's own temp too, which only the lock's holder writes
        data.clear_atomic_temps(os.path.dirname(os.path.abspath(out)), re.escape(os.path.basename(out)))
    write, note = _check_settings(parts, settings)  # on every rank, so that every rank stops alike
    # gloo, also beside CUDA: the ranks only meet at the start and the end, and a barrier must outwait the slowest
    # rank's share. A rank that dies ends the others' wait at once (its connections close).
    data.init_distributed("gloo", TIMEOUT)
    todo = finished = None
    if rank == 0:
        if note:
            print(note, file=sys.stderr)
        if write:
            try:
                os.makedirs(parts, exist_ok=True)
            except OSError as e:
                raise data.write_error(parts, e) from e
            with data.atomic_write(os.path.join(parts, "settings.json"), "w") as f:
                json.dump({**settings, "shard_paths": [os.path.abspath(s) for s in shards]}, f, indent=1)
        markers = [data.read_json(_part(parts, i, "done")) for i in range(len(shards))]
        todo = [i for i, m in enumerate(markers) if not isinstance(m, dict)]
        finished = [m["samples"] for m in markers if isinstance(m, dict)]
    if world > 1:  # every rank the same list, read before any rank marks a shard done
        box = [todo]
        torch.distributed.broadcast_object_list(box, src=0)
        todo = box[0]
    report = None
    if rank == 0:
        label = f"caption: rank 0 of {world}: " if world > 1 else "caption: "
        report = functools.partial(_report, data.Progress(), label, len(todo[rank::world]), finished)
    t0 = time.monotonic()
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    images = _caption_shards(shards, todo[rank::world], parts, processor, model, settings, batch_size, workers,
                             report)
    seconds = time.monotonic() - t0
    ran = [(images, seconds)]
    if world > 1:  # waits for the slowest rank
        ran = [None] * world
        torch.distributed.all_gather_object(ran, (images, seconds))
    summary = None
    if rank == 0:
        summary = {"out": out, "shards": len(shards), **_assemble(shards, parts, out),
                   "settings": {k: v for k, v in settings.items() if k != "shards"}}
        images, seconds = sum(n for n, _ in ran), max(s for _, s in ran)
        summary["this_run"] = {"images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}
        try:
            shutil.rmtree(parts)
        except OSError as e:
            raise data.UserError(f"{out} is complete, but {parts} could not be removed ({e.strerror}): "
                                 "remove it") from e
        lock.close()
    if world > 1:
        torch.distributed.barrier()  # so that `out` is complete wherever the command has ended
        torch.distributed.destroy_process_group()
    return summary


def _caption_shards(shards, mine, parts, processor, model, settings, batch_size, workers, report=None):
    """Caption the shards numbered `mine` (their unfinished tails) as settings say, appending to their progress files
    and marking each done; the number of images that went through the captioner. report: _report's partial, or None
    (the ranks but 0)."""
    captioned = {i: set(read_part(_part(parts, i, "jsonl"))) for i in mine}
    writer = _PartWriter(parts, collections.Counter({i: len(keys) for i, keys in captioned.items()}))
    prompt = settings["prompt"]
    text_inputs = prompt_inputs(processor, prompt)
    workers = min(workers, len(mine))
    # Workers decode and preprocess; this process only generates. Out of order: a slow worker holds up no other.
    batches = iter(torch.utils.data.DataLoader(
        _CaptionImages(shards, mine, captioned, processor.image_processor, batch_size, model.dtype,
                       data.duplicate_keys(data.key_index(shards), shards)), batch_size=None,
        num_workers=workers, pin_memory=model.device.type == "cuda", in_order=False,
        worker_init_fn=data.ignore_signals if workers else None))
    empty, seen, images, finished = collections.Counter(), {}, 0, []
    stopped = "caption: stopped by signal {signal}; run the same command again to continue"
    try:
        with data.on_signals(exit_message=stopped):
            for batch in batches:
                if batch["keys"]:
                    ids = generate_ids(model, batch["images"], text_inputs, settings["max_new_tokens"],
                                       settings["num_beams"])
                    captions = [clean_caption(t, prompt) for t in processor.batch_decode(ids, skip_special_tokens=True)]
                    for i, key, text in zip(batch["shards"], batch["keys"], captions):
                        if text:
                            writer.add(i, key, text)
                        else:
                            empty[i] += 1
                    writer.flush()
                    images += len(captions)
                for i, record in batch["finished"]:
                    if empty[i]:
                        record["skipped"]["empty_caption"] = empty.pop(i)
                    writer.finish(i, record)
                    finished.append(record["samples"])
                seen[batch["worker"]] = collections.Counter(batch["progress"])
                if report:
                    report(sum(writer.lines.values()), sum(seen.values(), collections.Counter()), finished)
    finally:
        writer.close()
        data.stop_workers(batches)  # as in TrainLoader.__iter__: the workers stop now, however the loop ended
    if report:
        report(sum(writer.lines.values()), sum(seen.values(), collections.Counter()), finished, final=True)
    return images


def _report(progress, label, n_shards, earlier, captioned, counts, finished, final=False):
    """Rank 0's progress line (data.Progress): captions, skips, images/s, shards and the ETA, which assumes that the
    shards still to do hold as many samples as the finished ones (`earlier`: by earlier runs; `finished`: by this
    one). counts: this rank's samples read, resumed (captioned before) and skipped so far."""
    if not (final or progress.due()):
        return
    done = earlier + finished
    progress.total = n_shards * sum(done) / len(done) - counts["resumed"] if done else None
    rate, eta = progress.measure(counts["samples"] - counts["resumed"])
    progress.show(f"{label}{captioned:,} captioned, {counts['skipped']:,} skipped, {rate:.1f} images/s, shards "
                  f"{len(finished)}/{n_shards}, ETA {data.duration(eta)}", final)


# -----------------------------------------------------------------------------
# benchmark: captions/s of the captioner alone


def bench(captioner=DEFAULT_CAPTIONER, random_type=None, batch_sizes=(64,), prompt=None, max_new_tokens=20,
          num_beams=1, precision="auto", device="auto", seconds=10.0, table=sys.stdout):
    """Captions/s of the captioner alone, on synthetic images already preprocessed (the loader's workers do that part
    of a real run, beside the GPU), for each batch size. Every caption is made max_new_tokens long: a real batch ends
    with its longest caption, so this is the low end of the captioner's rate. random_type (a transformers model type,
    e.g. "blip": BLIP-base's size) builds that model from its default config with random weights: nothing is
    downloaded, and the time per token is that of the trained model, unprompted. The lines go to `table`."""
    compute = data.choose_compute(device, precision)
    device, dtype = compute.device, compute.dtype
    transformers = data.import_transformers()
    if random_type:
        try:
            config = transformers.AutoConfig.for_model(random_type)
            with device:  # weights made where they run: a GPU initialises 224M parameters in a moment
                model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
            side = config.vision_config.image_size
        except (ValueError, KeyError, AttributeError) as e:
            raise data.UserError(f"--random {random_type}: not a transformers model type with an image-to-text model "
                                 "and an image size in its vision config (e.g. blip, blip-2, git)") from e
        text_inputs = {}

        def images(n):
            return {"pixel_values": torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))}
        name = f"{random_type}, random weights"
    else:
        processor, model, _ = load_captioner(captioner, device, dtype)
        text_inputs = prompt_inputs(processor, DEFAULT_PROMPTS.get(model.config.model_type, "")
                                    if prompt is None else prompt)
        rng = np.random.default_rng(0)
        pictures = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(8)]

        def images(n):
            return dict(processor.image_processor([pictures[k % 8] for k in range(n)], return_tensors="pt"))
        name = captioner
    result = {"captioner": name, "parameters": sum(p.numel() for p in model.parameters()),
              "precision": compute.precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores",
              "max_new_tokens": max_new_tokens, "num_beams": num_beams, "results": []}
    print(f"{name}: {result['parameters'] / 1e6:.0f}M parameters, {compute.precision} on {result['device']}, "
          f"{max_new_tokens} new tokens per caption, {num_beams} beam(s)", file=table)
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    for b in batch_sizes:
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in images(b).items()}
        per_batch = data.time_calls(lambda: generate_ids(model, batch, text_inputs, max_new_tokens, num_beams,
                                                         min_new_tokens=max_new_tokens),
                                    calls=2, seconds=seconds, sync=sync)
        rate = b / per_batch
        result["results"].append({"batch_size": b, "captions_per_s": rate,
                                  "device_hours_per_million": 1e6 / rate / 3600})
        print(f"batch {b}: {rate:.1f} captions/s ({per_batch:.3f} s per batch; {1e6 / rate / 3600:.2f} device-hours "
              "per million images)", file=table, flush=True)
    return result


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__)
    p.add_argument("shards", nargs="?",
                   help="directory, glob or brace list of .tar shards (default: none, for --bench)")
    p.add_argument("--out", help="the captions file to write, JSONL of {key, caption}; progress in OUT.parts/ "
                                 "(default: none, for --bench)")
    # the captioner
    p.add_argument("--captioner", default=DEFAULT_CAPTIONER,
                   help="a folder or Hugging Face model id that transformers' AutoProcessor and "
                        "AutoModelForImageTextToText load (BLIP, BLIP-2, GIT, Florence-2)")
    p.add_argument("--prompt", help="text the captioner continues (default: by model kind, BLIP 'a picture of', "
                                    "Florence-2 '<CAPTION>', none for others; '' for none)")
    p.add_argument("--max-new-tokens", type=data.positive_int, default=20, help="caption length limit, in tokens")
    p.add_argument("--num-beams", type=data.positive_int, default=1, help="beam search width (1: greedy decoding)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="weights and activations (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: the rank's GPU)")
    # the job
    p.add_argument("--batch-size", type=data.positive_int, nargs="+", default=[64],
                   help="images per generate call; with --bench, one or more to time")
    p.add_argument("--workers", type=data.nonnegative_int,
                   help="processes that decode and preprocess images, per rank (default: the node's CPU cores "
                        "shared among its ranks, at most 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the summary goes to stderr)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too (or ALIP_DEBUG=1)")
    # benchmark
    p.add_argument("--bench", action="store_true", help="time the captioner alone on synthetic images, in captions/s")
    p.add_argument("--random", metavar="MODEL_TYPE",
                   help="--bench: time this transformers model type (blip: BLIP-base's size) built from its default "
                        "config with random weights, instead of --captioner: nothing is downloaded (default: none)")
    p.add_argument("--seconds", type=data.positive_float,
                   help="--bench: timed per batch size, after one warm-up batch (default: 10)")
    args = p.parse_args(argv)
    if args.bench:
        unused = [flag for flag, value in (("SHARDS", args.shards), ("--out", args.out), ("--workers", args.workers))
                  if value is not None]
        if unused:
            p.error(f"{unused[0]} is not used by --bench, which times the captioner on synthetic images")
        if args.random and args.prompt is not None:
            p.error("--prompt is not used with --random, whose model has no processor: it captions unprompted")
    else:
        if not args.shards or not args.out:
            p.error("SHARDS and --out are required (or --bench)")
        if len(args.batch_size) > 1:
            p.error("--batch-size takes one number (several only with --bench)")
        bench_only = [flag for flag, value in (("--random", args.random), ("--seconds", args.seconds)) if value]
        if bench_only:
            p.error(f"{bench_only[0]} is for --bench only")
    return args


def main(argv=None):
    args = parse_args(argv)
    table = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON object alone
    if args.bench:
        r = bench(args.captioner, args.random, args.batch_size, args.prompt, args.max_new_tokens, args.num_beams,
                  args.precision, args.device, args.seconds or 10.0, table)
        print(json.dumps(r))
        return
    r = caption(args.shards, args.out, args.captioner, args.prompt, args.max_new_tokens, args.num_beams,
                args.batch_size[0], args.precision, args.device, args.workers)
    if r is None:  # the ranks but 0
        return
    if "nothing_to_do" in r:
        if args.json:  # the reason went to stderr
            print(json.dumps(r))
        return
    run = r["this_run"]
    print(f"{args.out}: {r['captions']} captions of {r['shards']} shards; this run {run['images']} images in "
          f"{run['seconds']:.0f} s, {run['images_per_s']:.1f} images/s", file=table)
    for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
        print(f"  skipped {reason}: {n}", file=table)
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    data.run_command(main)
