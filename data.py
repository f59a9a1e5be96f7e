"""data.py: the shards. Reading them (CLIP's tokenizer, image decoding and transforms, tar reading), loading them for
training, writing them, inspecting them, and the demo set. Stage one (captioning the shards) is caption.py.

Shards use the WebDataset layout: members "{key}.{ext}" grouped by key, e.g. 000123.jpg, 000123.txt
(raw web text) and 000123.syn.txt (the synthetic caption ALIP adds). img2dataset output works as is.

    python data.py demo OUT                                   # procedural demo set (seconds)
    python data.py inspect 'shards/{00000..00099}.tar' [--json] [--captions caps.jsonl]
    python data.py make images/meta.csv OUT --shard-size 10000
    python data.py add-captions 'shards/*.tar' caps.jsonl OUT
    python data.py bench --synthetic [--workers 2]            # decode + augment throughput

Bad data never stops a run: every broken sample or shard is skipped and counted by reason
(loader.skipped), and only an excessive share of failures (max_bad_fraction) raises. Bad input to a
command (a flag, a path, a line of a file) is a UserError: one line on stderr and exit status 2.

Being the lowest file that every command imports, data.py also holds, in its last section, what every command
uses: errors and flags, signals, the device, precision and process group, the progress line and the timing loop,
atomic writes and locks, and the import of the optional transformers package.
"""
import argparse
import atexit
import collections
import contextlib
import csv
import errno
import fcntl
import functools
import glob
import gzip
import hashlib
import html
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
import weakref
import zipfile
import zlib
from typing import NamedTuple

import ftfy
import numpy as np
import regex
import torch
from PIL import Image, ImageDraw, ImageOps

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# -----------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE (Radford et al. 2021), same ids as OpenAI's simple_tokenizer.py.

SOT, EOT = 49406, 49407
# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of other symbols. The special
# tokens are matched first, so literal "<start_of_text>" in a caption becomes the special id, as in CLIP.
_WORD = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=None)
def _byte_chars():
    # GPT-2's trick: map every byte to a printable unicode character so BPE never sees raw
    # whitespace/control bytes; printable latin-1 bytes map to themselves, the rest to 256+n.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    # Insertion order matters: it is the order of the first 512 vocabulary ids.
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


@functools.lru_cache(maxsize=None)
def bpe_vocab():
    with gzip.open(os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        # First line is a version header; CLIP uses the first 49152 - 256 - 2 merges so that
        # 256 bytes + 256 end-of-word bytes + merges + 2 specials = 49408 ids.
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
    byte_chars = list(_byte_chars().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    return {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(merges)}


@functools.lru_cache(maxsize=1 << 18)  # web text repeats words a lot; BPE per word is the slow part
def _bpe(word):
    encoder, ranks = bpe_vocab()
    if word in ("<start_of_text>", "<end_of_text>"):
        return (encoder[word],)
    chars = _byte_chars()
    parts = [chars[b] for b in word.encode("utf-8")]
    parts[-1] += "</w>"
    while len(parts) > 1:
        # Merge the lowest-ranked adjacent pair everywhere it occurs, left to right.
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(encoder[p] for p in parts)


def _clean(text):
    # CLIP's cleaning: fix mojibake, unescape HTML twice (alt-text is often double-escaped),
    # collapse whitespace, lower-case.
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def tokenize(texts, context_length=77):
    """CLIP token ids, (N, context_length) long: SOT, BPE ids, EOT, zero padding; overlong text is cut
    and its last slot set to EOT (the text tower reads the feature at the EOT position)."""
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT] + [t for w in _WORD.findall(_clean(text)) for t in _bpe(w)] + [EOT]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOT
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# -----------------------------------------------------------------------------
# Image decoding and transforms (PIL + torch; same maths as torchvision's, which we may not depend on).

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation constants
STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.7, 1.0)  # ALIP's RandomResizedCrop: area share and aspect ratio
CROP_RATIO = (0.8, 1.25)
MAX_PIXELS = 8192 * 8192  # decompression-bomb cap, checked from the header before any pixel is decoded
# Pillow warns about images above its own, higher limit (Image.MAX_IMAGE_PIXELS, 89M pixels by default), on
# every open, in every worker. Each of them is above MAX_PIXELS as well, so it is refused and counted as
# image_too_large: the warning says nothing that loader.skipped does not.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Image files and shard members, for training and evaluation alike (clip_benchmark's wds_* exports use webp).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


# Reading EXIF goes through Pillow's TIFF reader, which warns about a damaged block on every such image, in every
# worker; the picture is then shown as stored, as viewers show it, and the warning tells nothing more.
warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")  # unsigned 16-bit gray: PNG, TIFF
_CONVERTS = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")  # Pillow's convert("RGB") is the picture
_ALPHA = ("1", "L", "P", "RGB", "LA", "PA", "RGBA")  # with transparency: to RGBA, then over white


def decode_image(raw, min_side=0, max_pixels=MAX_PIXELS):
    """RGB PIL image from encoded bytes, the picture a viewer shows on a white page; raises ValueError(reason)
    for anything unusable. min_side > 0 lets JPEGs decode at 1/2, 1/4 or 1/8 scale (DCT scaling, much cheaper)
    while both sides stay >= min_side. max_pixels=None leaves the cap to Pillow (2 x Image.MAX_IMAGE_PIXELS).

    How a file becomes 8-bit RGB, training and evaluation alike:
    - EXIF orientation (or XMP's, which Pillow reads too) is applied after decoding: phone photos come out
      upright. The draft size asked for is square, so min_side still holds after a quarter turn.
    - Transparency (an alpha channel, a palette's alpha, PNG's transparent colour) is composited over white,
      what a viewer shows on a white page: c * a/255 + 255 * (1 - a/255), rounded.
    - 16-bit samples keep their high byte (v >> 8): Pillow reduces 16-bit RGB(A) PNGs and TIFFs so before
      we see them, and the same rule for 16-bit gray keeps a gray and a colour copy of a picture alike
      (v >> 8 is within one level of v / 257, which Pillow uses for 16-bit colour PPMs).
    - CMYK and YCbCr: Pillow's conversions, R = (255 - C)(255 - K) / 255 and JPEG's full-range BT.601.
      LAB (D50, the ICC reference white): littleCMS without its lookup tables, which are off by up to 13
      levels in places (Pillow's convert uses them). Embedded ICC profiles are not applied: pixel values
      are taken as sRGB, as CLIP's and open_clip's loaders take them.
    - Animated and multi-frame files (GIF, APNG, WebP, MPO, TIFF): the first frame.
    - Pixel formats with no faithful RGB raise "unsupported_mode": floating-point or signed/32-bit integer
      samples (range unknown), and 16-bit PNGs with a transparent colour (Pillow compares it with pixels it
      has already reduced to 8 bits)."""
    if not raw:
        raise ValueError("empty_image")
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ValueError("image_too_large") from None
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        raise ValueError("not_an_image") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ValueError("image_too_large")
    try:
        if min_side and img.format in ("JPEG", "MPO"):  # MPO: a JPEG with more frames, as phones write them
            img.draft("RGB", (min_side, min_side))
        img.load()  # a truncated file fails here, not at open
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ValueError("corrupt_image") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)  # a lossless transpose, before any conversion drops the EXIF
    except (OSError, SyntaxError, ValueError):  # a damaged EXIF block: the picture as stored, as viewers show it
        pass
    try:
        rgb = _to_rgb(img, raw)
    except ValueError:  # a conversion this Pillow lacks
        rgb = None
    if rgb is None:
        raise ValueError("unsupported_mode")
    return rgb


def _to_rgb(img, raw):
    """The loaded img as RGB, or None where its pixel format has no faithful RGB (see decode_image)."""
    mode, key = img.mode, img.info.get("transparency")
    if img.format == "PNG" and key is not None:
        depth = raw[24]  # IHDR's bit depth: IHDR is a PNG's first chunk
        if mode == "RGB" and depth == 16:
            return None
        if mode == "L" and depth < 8:  # Pillow scales 2- and 4-bit gray to 0..255, but not the transparent level
            img.info["transparency"] = key = key * 255 // ((1 << depth) - 1)
    if mode in _SIXTEEN_BIT or (mode == "I" and img.format == "PPM"):  # Pillow scales PGM to 0..65535
        v = np.asarray(img)
        gray = (v >> 8).astype(np.uint8)
        if key is None:
            return Image.fromarray(gray).convert("RGB")
        alpha = np.where(v == key, 0, 255).astype(np.uint8)
        return _over_white(np.stack([gray, gray, gray, alpha], -1))
    if key is None and mode in _CONVERTS:
        return img if mode == "RGB" else img.convert("RGB")
    if mode in _ALPHA:
        return _over_white(np.asarray(img.convert("RGBA")))
    if mode == "LAB":
        return _lab_to_srgb().apply(img)
    return None


def _over_white(rgba):
    """(H, W, 4) uint8 composited over white, rounded exactly: 255 - round((255 - c) * a / 255)."""
    a = rgba[..., 3:].astype(np.uint16)  # 255 * 255 + 127 fits
    return Image.fromarray((255 - ((255 - rgba[..., :3].astype(np.uint16)) * a + 127) // 255).astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _lab_to_srgb():
    from PIL import ImageCms  # littleCMS; only LAB needs it
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB",
                                   ImageCms.Intent.RELATIVE_COLORIMETRIC, flags=ImageCms.Flags.NOOPTIMIZE)  # exact


def _to_uint8(img):
    # np.array, not asarray: PIL hands numpy read-only memory, which torch warns about. S*S*3 bytes.
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, S, S) uint8


def normalize(x, out=None):
    """uint8 (..., 3, S, S) -> float normalised with CLIP's mean/std, as one scale and one shift;
    written into `out` when given."""
    scale = 1 / (255 * torch.tensor(STD))
    shift = torch.tensor(MEAN) / torch.tensor(STD)
    out = x.float() if out is None else out.copy_(x)
    return out.mul_(scale.view(3, 1, 1)).sub_(shift.view(3, 1, 1))


def crop_params(width, height, generator, scale=CROP_SCALE, ratio=CROP_RATIO):
    """torchvision's RandomResizedCrop.get_params: 10 tries at a random area share and log-uniform
    aspect, then a centre crop clamped to the ratio range. Returns (left, top, w, h)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_min_side(image_size, scale=CROP_SCALE, ratio=CROP_RATIO):
    """Smallest decoded short side for which every random crop is still >= image_size, so draft
    decoding never makes the train transform upsample: a crop's short side is at least
    sqrt(scale_min / ratio_max) of the image's short side."""
    return math.ceil(image_size / math.sqrt(scale[0] / ratio[1]))


def random_crop_flip(img, generator, image_size):
    """The training augmentation: random resized crop, bilinear resize, flip p=0.5 -> (3, S, S) uint8.
    normalize() comes after, on whole batches at once in the loader, which is cheaper."""
    left, top, w, h = crop_params(img.width, img.height, generator)
    # resize(box=...) crops and resizes in one pass, without materialising the crop.
    img = img.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
    x = _to_uint8(img)
    return x.flip(2) if torch.rand(1, generator=generator).item() < 0.5 else x


def eval_transform(image_size):
    """callable(img) -> (3, S, S): bicubic resize of the shorter side to S, centre crop, normalise."""
    def transform(img):
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        long = int(image_size * long / short)  # torchvision's size rule
        w, h = (image_size, long) if w <= h else (long, image_size)
        img = img.resize((w, h), Image.BICUBIC)
        left, top = int(round((w - image_size) / 2)), int(round((h - image_size) / 2))
        return normalize(_to_uint8(img.crop((left, top, left + image_size, top + image_size))))
    return transform


# -----------------------------------------------------------------------------
# Shards: expansion, sample counts, reading.

def _expand_braces(spec):
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [s for i in range(lo, hi + 1)
                for s in _expand_braces(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])]
    m = re.search(r"\{([^{}]*,[^{}]*)\}", spec)
    if m:
        return [s for alt in m.group(1).split(",")
                for s in _expand_braces(spec[:m.start()] + alt + spec[m.end():])]
    return [spec]


def expand_shards(spec):
    """List of shard paths from directories, globs, brace lists ("a/{000..009}.tar", "{a,b}.tar") and
    several sources joined with "::" (open_clip's separator). Brace-listed paths are kept even if missing,
    so a missing shard is counted when read rather than silently dropped."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for part in (p for s in specs for p in str(s).split("::") if p):
        for path in _expand_braces(os.path.expanduser(part)):
            if os.path.isdir(path):
                out += sorted(glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*.tar.gz")))
            elif glob.has_magic(path):
                out += sorted(glob.glob(path))
            else:
                out.append(path)
    return out


def find_shards(spec, every=False):
    """expand_shards(spec) for a command's input: a UserError if none of them exists, or with every=True if any is
    missing (an evaluation must score every sample; training counts a missing shard when it reads it)."""
    shards = expand_shards(spec)
    missing = [s for s in shards if not os.path.exists(s)]
    if shards and (not missing or len(missing) < len(shards) and not every):
        firsts = {}
        for shard in shards:  # its samples would count twice an epoch, keys and all
            first = firsts.get(os.path.realpath(shard))
            if first is not None:
                raise UserError(f"{spec}: lists the shard {first} twice{f' (as {shard})' if shard != first else ''}; "
                                "list each shard once")
            firsts[os.path.realpath(shard)] = shard
        return shards
    if not shards:
        there = "no shards match it"
        if os.path.isdir(str(spec)):
            loose = any(f.lower().endswith(tuple("." + e for e in IMAGE_EXTS)) for f in os.listdir(spec))
            there = ("a folder of images, not of .tar shards: make shards of them with `python data.py make TABLE "
                     "OUT`, TABLE a CSV or JSONL with the columns image, text and caption" if loose
                     else "a directory without .tar shards")
        raise UserError(f"{spec}: {there}")
    if len(shards) == 1:
        raise UserError(f"{spec}: no such file or directory")
    raise UserError(f"{spec}: {len(missing)} of its {len(shards)} shards do not exist, e.g. {missing[0]}")


def _split_name(name):
    # WebDataset convention: key = path up to the first "." of the basename, ext = the rest.
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(dirname, stem) if dirname else stem, ext.lower()


def iter_samples(shards, stats=None, failed_shards=None, first_holder=None):
    """Yield {"__key__", "__shard__", ext: bytes, ...} for consecutive members sharing a key. Unreadable,
    empty or non-tar shards and tars cut off mid-member are counted in stats by reason, never raised;
    failed_shards (a dict), when given, gets shard -> reason for each of them. A sample whose key an earlier one
    holds, in its shard or (first_holder: duplicate_keys) in an earlier shard, comes marked "__duplicate__", for
    parse_sample to skip and count: a captions file, joined by key, would give both one caption."""
    stats = collections.Counter() if stats is None else stats
    for shard in shards:
        reason = yield from _iter_shard(shard, first_holder or {})
        if reason:
            stats[reason] += 1
            if failed_shards is not None:
                failed_shards[shard] = reason


def _iter_shard(shard, first_holder):
    # Yields the shard's samples, then returns the reason it failed, or None. A member whose extension the sample
    # holds already begins a new sample of the same key: two adjacent samples with one key stay two.
    sample, any_member, seen = None, False, set()

    def complete(sample):
        key = sample["__key__"]
        if key in seen or first_holder and first_holder.get(key_digest(key), shard) != shard:
            sample["__duplicate__"] = True
        seen.add(key)
        return sample

    try:
        if os.path.getsize(shard) == 0:
            return "empty_shard"
        with tarfile.open(shard, "r|*") as tar:  # streaming: works on pipes and never seeks
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if not ext or os.path.basename(key).startswith((".", "_")):
                    continue  # hidden files, __MACOSX, img2dataset's per-shard metadata
                any_member = True
                if sample is not None and (sample["__key__"] != key or ext in sample):
                    yield complete(sample)  # complete: a new key, or the same key again, has begun
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__shard__": shard}
                sample[ext] = tar.extractfile(member).read()
            # tarfile takes a tar cut inside a header for a normal end; an uncompressed tar ends with
            # at least two zero blocks (1024 bytes) after the last member, so fewer means cut off.
            if any_member and not shard.endswith(".gz") and os.path.getsize(shard) - tar.offset < 1024:
                return "truncated_tar"
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return "unreadable_shard"
    except (tarfile.ReadError, EOFError, zlib.error, OSError):
        # Failing before the first member means not a tar at all; after it, the tar was cut off
        # and the sample being assembled is incomplete, so it is dropped.
        return "truncated_tar" if any_member else "not_a_tar"
    if sample is not None:
        yield complete(sample)
    return None


def read_json(path):
    """The JSON value in the file at path, or None where there is no such file or it does not parse."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shard_sizes(shards, index=None):
    """Samples per shard (dict). Taken from sizes.json beside the shards (WebDataset), or img2dataset's
    {shard}_stats.json ("successes"), else from the key index (`index`, key_index's, or read here)."""
    sizes, todo = {}, []
    for shard in shards:
        d, base = os.path.split(os.path.abspath(shard))
        listing = read_json(os.path.join(d, "sizes.json")) or {}
        stats = read_json(os.path.join(d, base.split(".")[0] + "_stats.json")) or {}
        if base in listing:
            sizes[shard] = int(listing[base])
        elif "successes" in stats:
            sizes[shard] = int(stats["successes"])
        else:
            todo.append(shard)
    index = key_index(todo) if index is None else index
    sizes.update((shard, len(index[shard]["keys"])) for shard in todo)
    return sizes


# -----------------------------------------------------------------------------
# The key index: every sample's key and members, read once from each shard's tar headers (the data are skipped) and
# cached beside the shards. It finds the keys that more than one shard holds, and tells before a run how many
# samples a captions file covers.

INDEX_VERSION = 1


def key_digest(key):
    """16 bytes that stand for a sample's key in the index (a chance collision: ~1e-24 among 15M keys)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def _index_shard(shard):
    """{"keys": (n,) 16-byte digests, "exts": the extensions seen, "masks": (n,) which of them each sample holds}, for
    the samples in reading order, grouped as _iter_shard groups them; a broken shard: what it holds before the
    break."""
    keys, exts, masks, current, mask = [], {}, [], None, 0
    try:
        with tarfile.open(shard, "r:*") as tar:  # random access: the members' data are skipped, not read
            for member in tar:
                key, ext = _split_name(member.name)
                if not member.isfile() or not ext or os.path.basename(key).startswith((".", "_")):
                    continue
                bit = 1 << exts.setdefault(ext, len(exts)) if len(exts) < 64 or ext in exts else 0
                if key != current or mask & bit:
                    if current is not None:
                        keys.append(key_digest(current))
                        masks.append(mask)
                    current, mask = key, 0
                mask |= bit
    except (OSError, tarfile.ReadError, EOFError, zlib.error):
        pass  # reading the shard counts the damage
    if current is not None:
        keys.append(key_digest(current))
        masks.append(mask)
    return {"keys": np.array(keys, dtype="S16"), "exts": np.array(list(exts), dtype=str),
            "masks": np.array(masks, dtype=np.uint64)}


def key_index(shards):
    """{shard: _index_shard(shard)}, each read from its cache when the shard has not changed since (its size and
    modification time), else from the tar and cached: in .alip_index/ beside the shard, or under ~/.cache/alip where
    that folder is read-only."""
    index = {}
    for shard in shards:
        d, base = os.path.split(os.path.abspath(shard))
        try:
            st = os.stat(shard)
        except OSError:  # reading the shard counts it
            index[shard] = _index_shard(shard)
            continue
        stamp = np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)
        caches = [os.path.join(d, ".alip_index", base + ".npz"), os.path.join(
            os.path.expanduser("~/.cache/alip/index"), hashlib.sha1(d.encode()).hexdigest()[:16], base + ".npz")]
        for path in caches:
            with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile):
                with np.load(path) as cached:
                    if np.array_equal(cached["stamp"], stamp):
                        index[shard] = {k: cached[k] for k in ("keys", "exts", "masks")}
                        break
        if shard in index:
            continue
        index[shard] = _index_shard(shard)
        for path in caches:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with atomic_write(path) as f:
                    np.savez(f, stamp=stamp, **index[shard])
                break
            except (OSError, UserError):  # a read-only shard folder: the next place
                continue
    return index


def duplicate_keys(index, shards):
    """{digest: the first of `shards` that holds it} for each key that more than one of them holds."""
    unique = [np.unique(index[s]["keys"]) for s in shards]
    keys = np.concatenate(unique) if unique else np.array([], dtype="S16")
    owner = np.repeat(np.arange(len(shards)), [len(u) for u in unique])
    order = np.argsort(keys, kind="stable")  # a key's holders stay in shard order
    keys, owner = keys[order], owner[order]
    again = np.flatnonzero(keys[1:] == keys[:-1]) + 1  # the holders after the first
    firsts = np.unique(np.searchsorted(keys, keys[again]))  # where each repeated key's holders begin
    return {bytes(keys[i]): shards[owner[i]] for i in firsts}


def caption_coverage(index, shards, captions=None, caption_ext="syn.txt"):
    """How many samples of the shards have a caption, from the index: {"samples", "from_file" (None without a
    captions dict, whose empty captions count as none), "in_shards" (samples with a {key}.caption_ext member),
    "duplicates" (samples whose key an earlier one holds)}."""
    keys = [index[s]["keys"] for s in shards]
    every = np.concatenate(keys) if keys else np.array([], dtype="S16")
    in_shards = sum(int(((e["masks"] >> np.uint64(list(e["exts"]).index(caption_ext))) & np.uint64(1)).sum())
                    for e in map(index.get, shards) if caption_ext in list(e["exts"]))
    found = None
    if captions is not None:
        have = np.array([key_digest(k) for k, c in captions.items() if c.strip()], dtype="S16")
        found = int(np.isin(every, have).sum())
    return {"samples": len(every), "from_file": found, "in_shards": in_shards,
            "duplicates": len(every) - len(np.unique(every))}


def load_captions(path):
    """{key: caption} from a JSONL side file of {"key": ..., "caption": ...} lines (CRLF line ends and a UTF-8
    byte-order mark are fine)."""
    captions, n = {}, 0
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark first is no part of the first line
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line.lstrip("\ufeff"))  # files joined together keep each one's mark
                    captions[str(row["key"])] = str(row["caption"])
    except OSError as e:
        raise UserError(f"captions file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}, line {n + 1}: not UTF-8 text") from e
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not an object with "key" and "caption"
        raise UserError(f'{path}, line {n}: expected {{"key": ..., "caption": ...}}, got {line.strip()[:60]!r}') from e
    return captions


def _text(sample, ext, reason, stats):
    raw = sample.get(ext)
    if raw is None:
        stats["missing_" + reason] += 1
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["bad_utf8_" + reason] += 1
        return None
    if not text.strip():
        stats["empty_" + reason] += 1
        return None
    return text


# What a data set may record about a sample's texts in its {key}.json (the demo set does), as the codes the
# loader passes on: -1 where a sample records nothing.
TRUTH_RAW_TEXT = ("right", "other_image", "irrelevant")  # raw text: describes the image, another image, nothing
TRUTH_CAPTION = ("right", "wrong")


def parse_truth(sample):
    """[raw-text code, caption code] from the sample's {key}.json; -1 for what it does not record."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    return [names.index(meta[key]) if meta.get(key) in names else -1
            for key, names in (("raw_text", TRUTH_RAW_TEXT), ("caption", TRUTH_CAPTION))]


def parse_sample(sample, stats, captions=None, missing_caption="skip", min_side=0,
                 text_ext="txt", caption_ext="syn.txt"):
    """(image, text, caption) from a raw sample, or None with the reason counted in stats. The caption
    comes from the side file when given (it replaces the tar's), else from the tar; missing_caption="raw" uses the
    raw text where there is none. An empty or blank caption counts as none, from either place (empty_caption)."""
    if sample.get("__duplicate__"):  # see iter_samples
        stats["duplicate_key"] += 1
        return None
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if image_ext is None:
        stats["missing_image"] += 1
        return None
    text = _text(sample, text_ext, "text", stats)
    if text is None:
        return None
    if captions is not None:
        caption = captions.get(sample["__key__"])
        if missing_caption == "skip" and (caption is None or not caption.strip()):
            stats["missing_caption" if caption is None else "empty_caption"] += 1
        caption = caption if caption and caption.strip() else None
    else:
        # In "raw" mode an absent or broken caption is not a skip, so it is not counted.
        caption = _text(sample, caption_ext, "caption", stats if missing_caption == "skip" else collections.Counter())
    if caption is None:
        if missing_caption == "skip":
            return None
        caption = text
    try:
        image = decode_image(sample[image_ext], min_side)
    except ValueError as e:
        stats[str(e)] += 1
        return None
    return image, text, caption


# -----------------------------------------------------------------------------
# Training loader: an IterableDataset of whole batches, so the DataLoader's round-robin over workers
# gives one deterministic batch order. Shards are split over the rank x worker "slots"; batch k of
# the epoch is produced by logical worker k % workers of its rank.

MIN_SAMPLES_FOR_BAD_CHECK = 64  # judge the failure share only once it means something
SHUFFLE_BUFFER = 1000


def _seed(*parts):
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=7).digest(), "little")


def _shuffled(samples, rng):
    # WebDataset-style buffer shuffle: a random buffered sample is swapped out for each new one.
    buf = []
    for sample in samples:
        if len(buf) < SHUFFLE_BUFFER:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _assign(shards, sizes, n_slots, rng):
    # Shuffle, then give each shard to the slot holding the fewest samples so far: equal-size shards
    # go round-robin, uneven ones still balance (every slot must fill the same number of batches).
    order = list(shards)
    rng.shuffle(order)
    slots, load = [[] for _ in range(n_slots)], [0] * n_slots
    for shard in order:
        i = load.index(min(load))
        slots[i].append(shard)
        load[i] += max(sizes.get(shard, 1), 1)
    return slots


class _BatchStream(torch.utils.data.IterableDataset):
    """Yields (images, text ids, caption ids, batch index, worker's skip counts) for one rank."""

    def __init__(self, loader):
        self.loader = loader

    def _raw_stream(self, slot, n_slots, epoch, stats, failed_shards):
        # Endless: pass 0 is this slot's share of the epoch; when it runs dry (uneven shards or an
        # epoch longer than the data) later passes re-read the same shards in a new order.
        L = self.loader
        shards = L.shards
        for p in itertools.count():
            rng = random.Random(_seed(L.seed, epoch, slot, p))
            if L.resampled:
                # Shards drawn with replacement: no split needed, slots differ by their seeds.
                mine, split = [rng.choice(shards) for _ in range(max(1, len(shards) // n_slots))], False
            elif len(shards) < n_slots:
                mine, split = list(shards), True
                random.Random(_seed(L.seed, epoch, p)).shuffle(mine)  # the same order in every slot
            else:
                split = False
                mine = _assign(shards, L.sizes, n_slots, random.Random(_seed(L.seed, epoch)))[slot]
                if p > 0:
                    rng.shuffle(mine)
            n = 0
            # The buffer is flushed at the end of each pass, so a pass is only read once the previous
            # one is used up and broken shards are counted once per pass actually needed.
            raw = iter_samples(mine, stats, failed_shards, L.first_holder)
            if split:  # fewer shards than slots: split by sample index instead
                raw = (s for i, s in enumerate(raw) if i % n_slots == slot)
            for sample in _shuffled(raw, rng):
                sample["__pass__"] = p
                n += 1
                yield sample
            if n == 0:
                raise UserError(f"data: no samples at all in the shards of slot {slot}: "
                                   f"{mine[:5]}{' ...' if len(mine) > 5 else ''} (skipped so far: {dict(stats)})")

    def __iter__(self):
        # A UserError travels to the training process as a value: the DataLoader would re-raise it there
        # with the worker's traceback folded into the message.
        try:
            yield from self._batches()
        except UserError as e:
            yield e

    def _batches(self):
        L = self.loader
        info = torch.utils.data.get_worker_info()
        wid, W = (info.id, info.num_workers) if info else (0, 1)
        epoch, start, steps, B = L.epoch, L.start_batch, L.steps_per_epoch, L.batch_size
        # DataLoader hands the first task to worker 0; after a resume at batch `start` that must be
        # the logical worker that owns batch `start`, so physical ids are rotated.
        lw = (wid + start) % W
        slot, n_slots = L.rank * W + lw, L.world_size * W
        stats, per_shard, failed_shards = collections.Counter(), collections.Counter(), {}
        good = 0  # usable samples seen by this worker, the denominator of the failure share
        samples = self._raw_stream(slot, n_slots, epoch, stats, failed_shards)
        min_side = train_min_side(L.image_size)
        for k in range(lw, steps, W):
            images, texts, captions, truth, n = [], [], [], [], 0
            while n < B:
                sample = next(samples)
                parsed = parse_sample(sample, stats, L.captions, L.missing_caption, min_side, L.text_ext, L.caption_ext)
                if parsed is None:
                    per_shard[sample["__shard__"]] += 1
                    self._check_bad(good, stats, per_shard, failed_shards)
                    continue
                good += 1
                n += 1
                if k < start:
                    continue  # resuming: batch consumed already; parsing alone keeps the filtering exact
                image, text, caption = parsed
                # Seeded by the sample, not the worker: the same crop and flip for any worker count.
                shard = os.path.basename(sample["__shard__"])
                g = torch.Generator().manual_seed(_seed(L.seed, epoch, shard, sample["__key__"], sample["__pass__"]))
                images.append(random_crop_flip(image, g, L.image_size))
                texts.append(text)
                captions.append(caption)
                if L.truth:
                    truth.append(parse_truth(sample))
            if failed_shards:  # whole-shard losses count too, though no sample failed
                self._check_bad(good, stats, per_shard, failed_shards)
            if k >= start:
                out = torch.empty(B, 3, L.image_size, L.image_size)  # (B, 3, S, S)
                if info:  # fill the batch in shared memory at once, saving the copy the queue would make
                    out.share_memory_()
                batch = [normalize(torch.stack(images), out), tokenize(texts), tokenize(captions)]
                if L.truth:
                    batch.append(torch.tensor(truth, dtype=torch.long).view(B, 2))  # (B, 2)
                yield batch, k, dict(stats)

    def _check_bad(self, good, stats, per_shard, failed_shards):
        L = self.loader
        bad_samples = sum(per_shard.values())
        if good + bad_samples < MIN_SAMPLES_FOR_BAD_CHECK:
            return
        # A shard that cannot be read at all loses the samples sizes.json or _stats.json promised for
        # it (one if unknown); a tar cut off loses the sample being read.
        lost = sum(1 if r == "truncated_tar" else max(1, L.sizes.get(s, 0)) for s, r in failed_shards.items())
        bad, seen = bad_samples + lost, good + bad_samples + lost
        if bad / seen <= L.max_bad_fraction and good:
            return
        worst = [f"{s} ({r})" for s, r in failed_shards.items()][:5]
        worst += [f"{s} ({n} bad samples)" for s, n in per_shard.most_common(5)]
        advice = "Run `python data.py inspect` on them."
        if isinstance(L.captions_from, str) and stats.most_common(1)[0][0] == "missing_caption":
            advice = (f"Do the keys in {L.captions_from} match the shards' keys (KEY of KEY.jpg)? "
                      "`python data.py inspect SHARDS --captions FILE` shows how many do.")
        raise UserError(
            f"data: {bad} of {seen} samples failed ({bad / seen:.0%} > --max-bad-fraction {L.max_bad_fraction}); "
            f"reasons {dict(stats)}; worst shards: {', '.join(worst)}. {advice}")


class TrainLoader:
    """Exactly steps_per_epoch batches per epoch on every rank: (images (B,3,S,S), text (B,77), caption (B,77)),
    and with truth=True a fourth, (B, 2) int: what each sample's {key}.json records (see parse_truth).
    state_dict()/load_state_dict() store the data position (an epoch ends by moving on to the next one);
    resuming is exact for the same world size and worker count. captions: JSONL path or {key: caption};
    text_ext and caption_ext name the tar members holding raw text and caption.
    skipped: Counter of skipped samples (and broken shards) by reason."""

    def __init__(self, spec, *, image_size, batch_size, seed=0, rank=0, world_size=1, workers=2,
                 captions=None, missing_caption="skip", resampled=False, num_samples=None,
                 max_bad_fraction=0.5, text_ext="txt", caption_ext="syn.txt", truth=False):
        if missing_caption not in ("skip", "raw"):
            raise ValueError(f"missing_caption must be 'skip' or 'raw', not {missing_caption!r}")
        self.shards = find_shards(spec)
        index = key_index(self.shards)
        self.first_holder = duplicate_keys(index, self.shards)
        self.sizes = {} if num_samples else shard_sizes(self.shards, index)
        self.num_samples = num_samples or sum(self.sizes.values())
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.captions_from = str(captions) if isinstance(captions, (str, os.PathLike)) else None  # for messages
        self.captions = load_captions(captions) if self.captions_from else captions
        self.missing_caption, self.resampled, self.max_bad_fraction = missing_caption, resampled, max_bad_fraction
        self.text_ext, self.caption_ext, self.truth = text_ext, caption_ext, truth
        self.coverage = caption_coverage(index, self.shards, self.captions, caption_ext)
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"{spec}: {self.num_samples} samples in {len(self.shards)} shard(s), fewer than one "
                            f"global batch ({batch_size} x {world_size} ranks); lower --batch-size or add data")
        n_slots = world_size * max(workers, 1)
        if not resampled and len(self.shards) < n_slots and rank == 0:
            print(f"data: warning: {len(self.shards)} shards for {n_slots} rank x worker slots; "
                  f"splitting by sample, so every slot reads every shard")
        self.epoch, self.start_batch = 0, 0
        self.skipped = collections.Counter()
        self._done_epochs_skipped = collections.Counter()  # counts of epochs finished before this one
        self._worker_stats = {}  # this epoch's counts so far, by the logical worker that made them

    def caption_report(self):
        """One line for the start of a run: how many samples have a caption, and from where; a warning where few do
        (from the key index: before any image is read)."""
        c, n = self.coverage, max(self.coverage["samples"], 1)
        if self.captions is not None:
            found = c["from_file"]
            where = (f"in {self.captions_from or 'the captions given'}, which replaces the shards' own "
                     f".{self.caption_ext} (held by {c['in_shards']:,})")
        else:
            found, where = c["in_shards"], f"as {{key}}.{self.caption_ext} in the shards"
        rest = {"skip": "are skipped (--missing-caption skip)",
                "raw": "train on their raw text as caption (--missing-caption raw)"}[self.missing_caption]
        line = f"captions: {found:,} of {c['samples']:,} samples ({found / n:.0%}) have one {where}; the others {rest}"
        if c["duplicates"]:
            line += f"; {c['duplicates']:,} have the key of an earlier sample and are skipped (duplicate_key)"
        if found < 0.9 * c["samples"]:
            line = (f"warning: {line}. Are the captions' keys the shards' keys (KEY of KEY.jpg)? `python data.py "
                    "inspect SHARDS --captions FILE` shows them")
        return line

    def state_dict(self):
        if self.start_batch >= self.steps_per_epoch:
            return {"epoch": self.epoch + 1, "batch": 0, "skipped": dict(self.skipped)}
        # A worker's counts come with its batches; after a resume, those of a worker whose first batch is yet to
        # come are the ones saved here, so that the counts go on as if the run had not stopped.
        return {"epoch": self.epoch, "batch": self.start_batch, "skipped": dict(self._done_epochs_skipped),
                "workers": {str(w): dict(c) for w, c in self._worker_stats.items()}}

    def load_state_dict(self, sd):
        self.epoch, self.start_batch = int(sd["epoch"]), int(sd["batch"])
        self._done_epochs_skipped = collections.Counter(sd.get("skipped", {}))
        self._worker_stats = {int(w): collections.Counter(c) for w, c in sd.get("workers", {}).items()}
        self.skipped = self._done_epochs_skipped + sum(self._worker_stats.values(), collections.Counter())

    def batches(self, device):
        """The batches on `device`, epoch after epoch (an epoch moves the position on to the next by itself).
        Closing this generator stops the workers."""
        while True:
            with contextlib.closing(iter(self)) as epoch:
                for batch in epoch:
                    yield [b.to(device, non_blocking=True) for b in batch]

    def __iter__(self):
        W = max(self.workers, 1)
        batches = iter(torch.utils.data.DataLoader(
            _BatchStream(self), batch_size=None, num_workers=self.workers, persistent_workers=False,
            pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_signals))
        _LIVE_BATCHES.add(batches)
        worker_stats = self._worker_stats
        base = collections.Counter(self._done_epochs_skipped)
        try:
            for item in batches:
                if isinstance(item, UserError):  # from a worker, see _BatchStream.__iter__
                    raise item
                batch, k, stats = item
                assert k == self.start_batch, f"data: batch {k} arrived when {self.start_batch} was due"
                worker_stats[k % W] = collections.Counter(stats)
                self.skipped = base + sum(worker_stats.values(), collections.Counter())
                self.start_batch += 1
                yield tuple(batch)
        finally:
            # However the epoch ends (done, an error here or in a worker, the caller closing this generator),
            # stop the workers now, not once the DataLoader's iterator is collected (see _stop_live_workers).
            stop_workers(batches, then="continue with --resume (the last checkpoint is intact)")
        # The epoch is over: fold its counts in and move the position to the next epoch.
        self._done_epochs_skipped, self._worker_stats = collections.Counter(self.skipped), {}
        self.epoch, self.start_batch = self.epoch + 1, 0


# DataLoader iterators of TrainLoaders, whose workers may still run.
_LIVE_BATCHES = weakref.WeakSet()


def stop_workers(batches, then="run the same command again to continue"):
    """Stop the worker processes of a DataLoader's iterator now (the training loader's, stage one's). One that a
    signal has ended already (the out-of-memory killer's SIGKILL, most often) is remembered first: the error torch
    raises for it, wherever it lands, becomes one line that names the worker, the signal and what to do (`then`: how
    the command continues; see run_command)."""
    workers = getattr(batches, "_workers", [])  # none without workers
    for i, worker in enumerate(workers):
        if worker.exitcode is not None and worker.exitcode < 0 and not _LOST_WORKERS:
            sig = signal.Signals(-worker.exitcode)
            oom = ", most likely by the out-of-memory killer (see dmesg)" if sig == signal.SIGKILL else ""
            _LOST_WORKERS.append(f"data loader worker {i} of {len(workers)} (PID {worker.pid}) was ended by {sig.name}"
                                 f"{oom}; lower --workers or --batch-size, or give the job more memory, then {then}")
    # torch's own shutdown tells each worker to stop and joins it for up to 5 s, then sends SIGTERM, which ours
    # ignore: one still busy after that is killed, as its batch has no reader any more.
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
        for worker in workers:
            if worker.is_alive():
                worker.kill()


_LOST_WORKERS = []  # what stop_workers found: a loader worker that a signal ended


@atexit.register
def _stop_live_workers():
    # A loader left mid-epoch whose iterator is still referenced at exit (`it = iter(loader)` at module level, a
    # traceback kept by the interpreter) still has its workers. multiprocessing's exit handler would SIGTERM
    # them, which they ignore, then join them forever. This one runs first: exit handlers run last registered
    # first, and data.py registers it after importing torch, which registers multiprocessing's and the
    # DataLoader's own (after which the DataLoader no longer shuts its workers down).
    for batches in list(_LIVE_BATCHES):
        stop_workers(batches)


# -----------------------------------------------------------------------------
# Writing shards.

def write_tar(path, samples):
    """Write [(key, {ext: bytes})] as a tar shard, atomically (temp file, then rename). Fixed metadata
    makes the bytes depend on the samples only."""
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


def _write_sizes(out_dir, sizes):
    with atomic_write(os.path.join(out_dir, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=0, sort_keys=True)


# What --overwrite may replace: shards and their metadata (ours, img2dataset's), and atomic_write's temp files.
_SHARD_DIR_ENTRY = re.compile(r".+\.(tar|tar\.gz|json|parquet)(\.tmp\d+)?")


@contextlib.contextmanager
def new_data_dir(out_dir, overwrite=False, inputs=()):
    """A fresh directory beside out_dir to write a data set into: when the block ends without an error it
    replaces out_dir as a whole, else it is removed and out_dir stays as it was; out_dir never mixes old files
    with new ones, nor holds a part. Refused (a UserError, before anything is written): an out_dir that holds
    one of inputs; a non-empty out_dir without overwrite; with it, one that holds more than shards and their
    .json/.parquet files (a folder of images, say), which replacing as a whole would delete."""
    out_dir = os.path.realpath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file; the output must be a directory")
    inside = next((p for p in inputs if os.path.commonpath([os.path.realpath(p), out_dir]) == out_dir), None)
    if inside is not None:
        raise UserError(f"{out_dir} holds the input {inside}; write to another directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if entries and not overwrite:
        raise UserError(f"{out_dir} is not empty (it holds {entries[0]!r}{' and more' if len(entries) > 1 else ''});"
                        " pass --overwrite to replace it as a whole, or choose another directory")
    other = [e for e in entries if not (_SHARD_DIR_ENTRY.fullmatch(e) and os.path.isfile(os.path.join(out_dir, e)))]
    if other:
        raise UserError(f"{out_dir} holds more than shards (e.g. {other[0]!r}); --overwrite replaces only a "
                        "directory of shards and their .json files: choose another directory")
    tmp = temp_beside(out_dir)
    try:
        yield tmp
        swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when swapped in


def temp_beside(path):
    """A new empty directory beside path, hidden, on the same file system (renaming it to path is atomic), with the
    permissions of path, or those a new directory gets. Those a killed process of this host left are removed first:
    their names hold the host and the PID, which no longer runs."""
    parent, base = os.path.split(path)
    if os.path.ismount(path):
        raise UserError(f"{path} is a mount point, and a data set is written beside its folder and renamed into "
                        "place: give a folder inside it")
    here, mask = socket.gethostname(), os.umask(0)
    os.umask(mask)
    try:
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):
            left = re.fullmatch(re.escape(f".{base}.tmp.{here}.") + r"(\d+)", name)
            if left and not _running(int(left.group(1))):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        tmp = os.path.join(parent, f".{base}.tmp.{here}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a write that failed
        os.mkdir(tmp, 0o700)
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.isdir(path) else 0o777 & ~mask)
        return tmp
    except OSError as e:
        raise write_error(path, e) from e


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def swap_in(new, path):
    """Rename the complete directory `new` to path. A path that holds files is renamed aside first and removed
    after: a crash between the two renames leaves the old content whole beside it, as {new}.old."""
    try:
        try:
            os.rename(new, path)  # path absent, or an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            os.rename(path, new + ".old")
            os.rename(new, path)
            shutil.rmtree(new + ".old", ignore_errors=True)
    except OSError as e:
        raise write_error(path, e) from e


# -----------------------------------------------------------------------------
# Demo dataset: two coloured shapes per image, the class is their pair of colours (15 classes), attributes a
# from-scratch ViT learns in CPU minutes. Raw texts are noisy the way web alt-text is, often about another
# image or about nothing; synthetic captions are mostly right. Each training sample records which in its
# {key}.json (where img2dataset writes its metadata), so that gate quality can be measured against the truth.

COLOURS = {"red": (205, 40, 40), "green": (40, 165, 60), "blue": (40, 75, 215),
           "yellow": (230, 210, 40), "purple": (140, 55, 185), "orange": (245, 135, 25)}
SHAPES = ("circle", "square")
PAIRS = [(a, b) for i, a in enumerate(COLOURS) for b in list(COLOURS)[i + 1:]]  # label = index in PAIRS
CLASSNAMES = [f"{a} and {b}" for a, b in PAIRS]
DEMO_TRAIN, DEMO_SHARDS, DEMO_TEST, DEMO_SIDE = 8192, 8, 1000, 32
RAW_RIGHT, RAW_OTHER = 0.3, 0.4  # raw text: right, about another image's colours, else irrelevant (0.3)
CAPTION_WRONG = 0.15  # caption: one of the two colours replaced by a third

_RELEVANT = ["{a} and {b} shapes | free shipping", "IMG_{n} - {a} {b}", "{A} & {B}. best price", "{a} {b}",
             "{a} and {b} wall decal vinyl", "Buy {a} {b} stickers online", "{a}-{b}-icon.png", "{A} {B} Clipart",
             "vintage {a} and {b} print 24x36", "dots in {a} and {b}", "#{a} #{b} #art", "{a} and {b}",
             "cute {a} and {b} decor for kids room", "new! {a} + {b} - sale", "{a} {b} png transparent"]
_IRRELEVANT = ["click here to subscribe", "DSC_{n}.JPG", "untitled", "best deals {y}", "image", "photo",
               "IMG_{n}.jpg", "home page banner", "loading...", "thumbnail", "free download", "logo",
               "copyright all rights reserved", "sale 50% off", "new arrivals", "contact us", "read more",
               "screenshot {y}-0{m}-1{m}", "placeholder", "404 not found", "share on facebook", "pin it",
               "my vacation {y}", "product image {n}", "default_avatar", "banner_{n}.gif", "spacer",
               "advertisement", "see details", "add to cart", "posted by admin", "view larger", "no image available",
               "Shop Now >>", "follow us on instagram", "terms and conditions", "image {n} of 12", "avatar"]
_CAPTIONS = ["a {} {} and a {} {}", "a {} {} next to a {} {}", "a {} {} beside a {} {} on a gray background"]


def _demo_image(rng, noise, colours, shapes):
    """Gray background; one shape in each half (left / right or top / bottom), so the two never overlap."""
    side = DEMO_SIDE
    v = int(rng.uniform(90, 150))
    img = Image.new("RGB", (side, side), (v, v, v))
    draw = ImageDraw.Draw(img)
    halves = (0, 1) if rng.random() < 0.5 else (1, 0)
    vertical = rng.random() < 0.5
    for colour, shape, half in zip(colours, shapes, halves):
        r = side * rng.uniform(0.14, 0.22)
        u = (half + 0.5) * side / 2 + rng.uniform(-1, 1) * side / 16  # across the split, inside its half
        w = rng.uniform(r + 1, side - r - 1)  # along the split, anywhere the shape fits
        cx, cy = (w, u) if vertical else (u, w)
        fill = tuple(int(min(255, max(0, c + rng.integers(-18, 19)))) for c in COLOURS[colour])
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            q = 0.85 * r  # a square of the same "size" looks bigger than a circle; shrink it a little
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    x = np.asarray(img, dtype=np.int16) + noise[rng.integers(len(noise))]
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))


def _messy_case(text, rnd):
    return rnd.choice([text, text, text.lower(), text.upper(), text.title()])


def _pair_text(rnd, a, b):
    a, b = (a, b) if rnd.random() < 0.5 else (b, a)
    template = rnd.choice(_RELEVANT)
    return _messy_case(template.format(a=a, b=b, A=a.title(), B=b.title(), n=rnd.randrange(1000, 9999)), rnd)


def _demo_raw_text(rnd, pair):
    """(raw text, truth): right, about another image (another pair of colours), or irrelevant."""
    u = rnd.random()
    if u < RAW_RIGHT:
        return _pair_text(rnd, *pair), "right"
    if u < RAW_RIGHT + RAW_OTHER:
        return _pair_text(rnd, *rnd.choice([p for p in PAIRS if p != pair])), "other_image"
    template = rnd.choice(_IRRELEVANT)
    text = template.format(n=rnd.randrange(1000, 9999), y=rnd.randrange(2009, 2024), m=rnd.randrange(1, 9))
    return _messy_case(text, rnd), "irrelevant"


def _demo_caption(rnd, colours, shapes):
    """(caption, truth): both shapes described, in random order; wrong ones name a third colour for one."""
    colours, truth = list(colours), "right"
    if rnd.random() < CAPTION_WRONG:
        colours[rnd.randrange(2)] = rnd.choice([c for c in COLOURS if c not in colours])
        truth = "wrong"
    parts = list(zip(colours, shapes))
    rnd.shuffle(parts)
    return rnd.choice(_CAPTIONS).format(*parts[0], *parts[1]), truth


def _demo_split(out, n, n_shards, seed, split):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])  # separate streams per split
    rnd = random.Random(_seed("demo", seed, split))
    noise = rng.integers(-8, 9, size=(64, DEMO_SIDE, DEMO_SIDE, 3), dtype=np.int16)
    per_shard = -(-n // n_shards)
    sizes = {}
    for j in range(n_shards):
        samples = []
        for i in range(j * per_shard, min(n, (j + 1) * per_shard)):
            label = int(rng.integers(len(PAIRS)))
            colours = PAIRS[label] if rng.random() < 0.5 else PAIRS[label][::-1]
            shapes = tuple(SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=2))
            img = _demo_image(rng, noise, colours, shapes)
            buf = io.BytesIO()
            if split == "train":
                # JPEG q95 4:4:4 decodes as fast as PNG here and encodes ~8x faster (measured).
                img.save(buf, "JPEG", quality=95, subsampling=0)
                text, text_truth = _demo_raw_text(rnd, PAIRS[label])
                caption, caption_truth = _demo_caption(rnd, colours, shapes)
                files = {"jpg": buf.getvalue(), "txt": text.encode(), "syn.txt": caption.encode(),
                         "json": json.dumps({"raw_text": text_truth, "caption": caption_truth}).encode()}
            else:
                img.save(buf, "PNG", compress_level=1)
                files = {"png": buf.getvalue(), "cls": str(label).encode(),
                         "txt": f"a photo of a {colours[0]} {shapes[0]} and a {colours[1]} {shapes[1]}.".encode()}
            samples.append((f"{i:06d}", files))
        name = f"{j:05d}.tar"
        write_tar(os.path.join(out, name), samples)
        sizes[name] = len(samples)
    _write_sizes(out, sizes)


def write_demo(out_dir, seed=0):
    """Build (or reuse) the demo dataset: {"train": dir, "test": dir}. Written to a temp dir beside out_dir and
    swapped in whole (as new_data_dir does), so a directory with the .complete marker is always whole. A demo
    set of another seed is replaced; any other non-empty out_dir is refused."""
    out_dir = os.path.abspath(out_dir)
    paths = {"train": os.path.join(out_dir, "train"), "test": os.path.join(out_dir, "test")}
    marker = os.path.join(out_dir, ".complete")
    want = {"seed": seed, "version": 2}  # bumped whenever the generator changes what it writes
    if read_json(marker) == want:
        return paths
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file; the demo set is a directory: choose another path")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(marker):
        raise UserError(f"{out_dir} exists and is not a demo dataset (it has no .complete); not overwriting it: "
                        "move it away or choose another directory")
    tmp = temp_beside(out_dir)
    try:
        for split, n, n_shards in (("train", DEMO_TRAIN, DEMO_SHARDS), ("test", DEMO_TEST, 1)):
            os.makedirs(os.path.join(tmp, split))
            _demo_split(os.path.join(tmp, split), n, n_shards, seed, split)
        with atomic_write(os.path.join(tmp, "test", "classnames.txt"), "w") as f:
            f.write("\n".join(CLASSNAMES) + "\n")
        with atomic_write(os.path.join(tmp, ".complete"), "w") as f:
            json.dump(want, f)
        if read_json(marker) != want:  # else another process (e.g. a second rank) finished first
            try:
                swap_in(tmp, out_dir)
            except UserError:
                if read_json(marker) != want:  # another process's copy, swapped in meanwhile, is as good
                    raise
    except OSError as e:  # making a directory in tmp: the files go through atomic_write
        raise write_error(out_dir, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


# -----------------------------------------------------------------------------
# Commands: inspect, make, add-captions, bench, demo.

def inspect(spec, captions=None, missing_caption="skip", previews=3):
    """Scan shards as training would (decoding every image) and report what is usable and why the rest is not."""
    shards = find_shards(spec)
    caps = load_captions(captions) if isinstance(captions, (str, os.PathLike)) else captions
    stats, coverage, shown = collections.Counter(), collections.Counter(), []
    usable = total = 0
    for sample in iter_samples(shards, stats, first_holder=duplicate_keys(key_index(shards), shards)):
        total += 1
        coverage.update(e for e in sample if not e.startswith("__"))
        if caps is not None:
            coverage["captions file"] += sample["__key__"] in caps
        parsed = parse_sample(sample, stats, caps, missing_caption)
        if parsed is not None:
            usable += 1
            if len(shown) < previews:
                image, text, caption = parsed
                shown.append({"key": sample["__key__"], "shard": sample["__shard__"], "size": list(image.size),
                              "text": text[:100], "caption": caption[:100]})
    return {"shards": len(shards), "samples": total, "usable": usable, "skipped": dict(stats),
            "coverage": {k: v / max(total, 1) for k, v in sorted(coverage.items())}, "previews": shown}


def _read_table(path):
    """The rows of a CSV or JSONL table, each a dict with an "image" path. The CSV has a header and may be
    separated by commas, semicolons or tabs, as spreadsheets save it; a UTF-8 byte-order mark, CRLF line ends and
    quoted fields holding separators or line breaks are read as spreadsheets mean them."""
    rows, n = [], 0
    try:
        # utf-8-sig: the byte-order mark spreadsheets and Windows editors put first is not part of the header.
        with open(path, newline="", encoding="utf-8-sig") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line.lstrip("\ufeff"))  # files joined together keep each one's mark
                        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
                            raise UserError(f'{path}, line {n}: expected {{"image": PATH, "text": ...}}, '
                                            f"got {line.strip()[:60]!r}")
                        rows.append(row)
            else:
                header = f.readline()
                # Where the comma is the decimal mark, spreadsheets separate CSV fields by semicolons.
                delimiter = next((d for d in ",;\t" if "image" in [name.strip() for name in
                                  next(csv.reader([header], delimiter=d), [])]), ",")
                f.seek(0)
                reader = csv.DictReader(f, delimiter=delimiter)
                reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
                if "image" not in reader.fieldnames:
                    raise UserError(f"{path}: no column 'image' (its header: {reader.fieldnames!r}); the table needs "
                                    "a header with the columns image, text and optionally caption")
                for row in reader:
                    if not row["image"]:  # None: the line has fewer fields than the header
                        raise UserError(f"{path}, line {reader.line_num}: no image path; fill in its image cell "
                                        "or delete the line")
                    rows.append(row)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); save the table as UTF-8 (\"CSV UTF-8\")") from e
    except ValueError as e:
        raise UserError(f"{path}, line {n}: not a JSON object ({e})") from e
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: {e}") from e
    if not rows:
        raise UserError(f"{path}: the table has no rows")
    return rows


def make_shards(src, out_dir, shard_size=10000, overwrite=False):
    """Shards from a CSV/JSONL table with columns image (path relative to the table), text and optional
    caption. src is the table or a directory holding exactly one. Image bytes are stored as they are.
    out_dir is written as a whole (see new_data_dir): a non-empty one only with overwrite."""
    if os.path.isdir(src):
        tables = [p for p in sorted(os.listdir(src)) if p.endswith((".csv", ".jsonl"))]
        if len(tables) != 1:
            raise UserError(f"{src}: expected one .csv or .jsonl table in it, found {len(tables)} {tables[:5]}")
        src = os.path.join(src, tables[0])
    rows, root = _read_table(src), os.path.dirname(os.path.abspath(src))
    paths = [os.path.join(root, row["image"]) for row in rows]
    where = "image paths are relative to the table's folder"
    if not any(map(os.path.isfile, paths)):  # an input error, so found before the output is looked at
        raise UserError(f"{src}: none of its {len(rows)} images was found, e.g. {paths[0]!r}; {where}")
    sizes, samples, missing = {}, [], []
    with new_data_dir(out_dir, overwrite, inputs=[src]) as tmp:
        def flush():
            name = f"{len(sizes):05d}.tar"
            write_tar(os.path.join(tmp, name), samples)
            sizes[name] = len(samples)
            samples.clear()

        for i, (row, path) in enumerate(zip(rows, paths)):
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            try:
                with open(path, "rb") as f:
                    files = {ext: f.read()}
            except OSError:
                missing.append(path)
                continue
            files["txt"] = str(row.get("text") or "").encode()
            if row.get("caption"):
                files["syn.txt"] = str(row["caption"]).encode()
            samples.append((f"{i:09d}", files))
            if len(samples) == shard_size:
                flush()
        if samples:
            flush()
        if not sizes:
            raise UserError(f"{src}: none of its {len(rows)} images could be read, e.g. {missing[0]!r}")
        _write_sizes(tmp, sizes)
    if missing:
        print(f"data: warning: {len(missing)} of {len(rows)} images not found, skipped (e.g. {missing[0]!r}; "
              f"{where})", file=sys.stderr)
    return {"samples": sum(sizes.values()), "shards": len(sizes), "missing_image_files": len(missing)}


def add_captions(spec, captions, out_dir, overwrite=False):
    """Copy shards to out_dir with each sample's caption from the JSONL side file added as {key}.syn.txt.
    out_dir is written as a whole (see new_data_dir): a non-empty one only with overwrite, and never the
    folder of the input shards."""
    shards = find_shards(spec)
    caps = load_captions(captions) if isinstance(captions, (str, os.PathLike)) else captions
    names = collections.defaultdict(list)
    for shard in shards:
        names[os.path.basename(shard).split(".")[0] + ".tar"].append(shard)
    clash = next((group for group in names.values() if len(group) > 1), None)
    if clash:
        raise UserError(f"{spec}: the shards {clash[0]} and {clash[1]} would both be copied to "
                        f"{os.path.basename(clash[0]).split('.')[0]}.tar; copy them in separate runs")
    stats, sizes, counts = collections.Counter(), {}, collections.Counter()
    with new_data_dir(out_dir, overwrite, inputs=shards) as tmp:
        for name, (shard,) in names.items():
            samples = []
            for sample in iter_samples([shard], stats):
                files = {k: v for k, v in sample.items() if not k.startswith("__")}
                if sample["__key__"] in caps:
                    files["syn.txt"] = caps[sample["__key__"]].encode()
                counts["with_caption" if "syn.txt" in files else "without_caption"] += 1
                samples.append((sample["__key__"], files))
            write_tar(os.path.join(tmp, name), samples)
            sizes[name] = len(samples)
        _write_sizes(tmp, sizes)
    return {**counts, "shards": len(sizes), "skipped": dict(stats)}


def _synthetic_jpegs(out_dir, n=200, seed=0):
    # Photo-like 500-px JPEGs (smooth gradients, shapes, sensor noise), the typical img2dataset size.
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        w, h = (500, 375) if i % 2 else (375, 500)
        yy, xx = np.mgrid[0:h, 0:w] / 500.0
        wave = xx[..., None] * rng.uniform(1, 6, 3) + yy[..., None] * rng.uniform(1, 6, 3)
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(wave))
        img = Image.fromarray((base + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 50), rng.integers(0, h - 50)
            draw.ellipse((x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)),
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        samples.append((f"{i:06d}", {"jpg": buf.getvalue(), "txt": b"a synthetic photo", "syn.txt": b"a photo"}))
    # Four shards, so that up to four workers split by shard as they would on real data.
    for j in range(4):
        write_tar(os.path.join(out_dir, f"{j:05d}.tar"), samples[j::4])
    _write_sizes(out_dir, {f"{j:05d}.tar": len(samples[j::4]) for j in range(4)})


def bench(spec, image_size=224, workers=2, batch_size=64, seconds=3.0):
    """Images/s in one process for a baseline (full decode, convert, crop, bilinear resize) and for our
    path (draft decode, fused crop+resize), then through the real loader with `workers` processes."""
    raws = [s[e] for s in iter_samples(find_shards(spec)) for e in IMAGE_EXTS if e in s][:500]
    if not raws:
        raise UserError(f"{spec}: no images in these shards")
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def baseline(raw):
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        left, top, w, h = crop_params(img.width, img.height, g)
        img = img.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.BILINEAR)
        return (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std

    min_side = train_min_side(image_size)

    def ours(raw):
        return normalize(random_crop_flip(decode_image(raw, min_side), g, image_size))

    def rates(fns):
        # Alternate short rounds so that load from other processes on a shared machine hits all alike.
        turns, spent, rounds = [itertools.count() for _ in fns], [0.0] * len(fns), 0
        while min(spent) < seconds:
            for i, (fn, turn) in enumerate(zip(fns, turns)):
                spent[i] += 20 * time_calls(lambda: fn(raws[next(turn) % len(raws)]), calls=20, warmup=0)
            rounds += 1
        return [20 * rounds / s for s in spent]

    torch.set_num_threads(1)  # one core per worker, as in DataLoader workers
    sizes = [Image.open(io.BytesIO(r)).size for r in raws[:50]]
    result = {"image_size": image_size, "images": len(raws), "mean_pixels": float(np.mean([w * h for w, h in sizes]))}
    result["baseline_per_core"], result["ours_per_core"] = rates([baseline, ours])
    result["speedup"] = result["ours_per_core"] / result["baseline_per_core"]
    loader = TrainLoader(spec, image_size=image_size, batch_size=batch_size, workers=workers,
                         num_samples=10 ** 9, missing_caption="raw")
    it = iter(loader)
    loader_rate = batch_size / time_calls(lambda: next(it), seconds=seconds)  # the first call starts the workers
    # The loader adds tar reading, text cleaning, tokenizing, collation and the copy between processes.
    result["loader_workers"], result["loader_images_per_s"] = workers, loader_rate
    result["workers_for_4000_per_s"] = math.ceil(4000 / (loader_rate / max(workers, 1)))
    return result


# -----------------------------------------------------------------------------
# What every command uses (caption.py, alip.py, eval.py and this file's own): data.py is the lowest file they all
# import, so it holds them. Errors and flags; signals; device, precision and the process group; the progress line
# and the timing loop; atomic writes and locks; the import of the optional transformers package.


class UserError(Exception):
    """Bad input: a flag, a file or a line of one. Each command line prints the message as one line and
    exits with status 2 (run_command); any other exception is a bug and keeps its traceback."""


def run_command(main, argv=None):
    """main(argv) as a command: a UserError becomes `error: MESSAGE` on stderr and exit status 2, with
    the traceback too under --debug or ALIP_DEBUG=1. Under torchrun, a collective that fails because another
    rank has ended (which prints its own error) is one line too, with exit status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("ALIP_DEBUG") == "1"
    try:
        try:
            main(argv)
        finally:  # --help's SystemExit too: a reader gone away is caught below, not at exit as a traceback
            sys.stdout.flush()
    except BrokenPipeError:  # the reader of the output has gone (`| head`): nothing more to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except UserError as e:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if _LOST_WORKERS:  # what torch says of a worker that a signal ended ("exited unexpectedly"), in one line
            if debug:
                traceback.print_exc()
            print(f"error: {_LOST_WORKERS[0]}", file=sys.stderr)
            sys.exit(2)
        if not _peer_lost(e):
            raise
        sys.stdout.flush()
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"error: rank {os.environ.get('RANK', '?')}: lost contact with another rank of the run, which has most "
              f"likely ended (see its error): {first}", file=sys.stderr)
        sys.exit(1)


# What gloo says when the process at the other end of a collective has gone; NCCL's ranks wait instead, until
# torchrun stops them.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_lost(e):
    """Whether e, in one process of a multi-process run, says that another process has gone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        isinstance(e, getattr(torch.distributed, "DistNetworkError", ())) or any(m in str(e) for m in PEER_LOST))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every flag's default after its help (argparse's own), unless the help says in
    words what its default is; a required flag has none, and says so."""

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return (action.help or "") + " (required)"
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose complaints are one-line UserErrors instead of a usage block, and whose --help
    shows every default."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _number(kind, ok, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # also refuses nan, which compares false
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a number > 0")
nonnegative_float = _number(float, lambda v: 0 <= v < math.inf, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def comma_list(text):
    """A flag's comma-separated names ("tensorboard,wandb") as a list."""
    return [name.strip() for name in text.split(",") if name.strip()]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a scheduler's preemption or torchrun stopping a rank; Ctrl-C


@contextlib.contextmanager
def on_signals(exit_message=None):
    """What SIGTERM and SIGINT do while the block runs; the previous handlers are back after it. Without exit_message
    they only set stop["signal"] (the block gets `stop`): a loop that checks it finishes its step, saves and ends
    cleanly, and a second signal ends the process at once. With it, a signal raises SystemExit(exit_message) at once
    (its {signal} filled in), so the block's `finally` clauses run as for any error."""
    stop = {"signal": None}

    def handler(signum, frame):
        if exit_message is not None:
            raise SystemExit(exit_message.format(signal=signum))
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_signals(worker_id=None):
    """A loader worker's start (DataLoader's worker_init_fn): SIGTERM and Ctrl-C reach the whole process group, and
    the main process, which handles them (on_signals), stops its workers itself once it is done with them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class Compute(NamedTuple):
    """Where a command computes, and in what precision (choose_compute)."""
    device: torch.device
    precision: str  # "bf16", "fp16" or "fp32"
    reason: str

    @property
    def dtype(self):  # of the weights of a model run in this precision
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    @property
    def amp(self):  # of autocast, or None: fp32 runs without it
        return None if self.precision == "fp32" else self.dtype


def choose_compute(device="auto", precision="auto", flag="--device"):
    """The device and the precision, decided here once for every command. device: auto (CUDA where torch sees it),
    cpu, cuda or cuda:N; cuda under torchrun is the rank's GPU (LOCAL_RANK), which becomes the current one.
    precision auto: bf16 on CUDA, fp32 on the CPU, where bf16 matmuls are slow."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"{flag} {device}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: torch sees no CUDA device here; pass {flag} cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    reasons = {"bf16": "bf16 autocast, fp32 master weights", "fp16": "fp16 autocast, fp32 master weights",
               "fp32": "fp32" + (" (the CPU default: bf16 matmuls are slow on most CPUs)" if device.type == "cpu"
                                 else "")}
    return Compute(device, precision, reasons[precision])


def init_distributed(backend, timeout):
    """(rank, world size): under torchrun (RANK set) this process joins the run's process group (`backend`: nccl or
    gloo; a collective waits up to `timeout`, a timedelta); else (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not torch.distributed.is_initialized():  # --demo's second run finds the group of its first
        torch.distributed.init_process_group(backend, timeout=timeout)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def duration(seconds):
    """h:mm:ss, or ? for None."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A job's rate and ETA, and its progress line on stderr: the one progress line of every command (training's log
    line takes its rate and ETA from here too). `total` may change as the job learns its size."""

    LOG_SECONDS = 30  # a line this often in a log file; on a terminal the line is redrawn every second

    def __init__(self, total=None, done=0):
        self.total, self.start, self.last = total, done, done
        self.t0 = self.t = self.shown = time.monotonic()
        self.tty = sys.stderr.isatty()

    def measure(self, done):
        """(units/s since the previous measure, seconds left at the mean rate since the start or None)."""
        now = time.monotonic()
        rate = (done - self.last) / max(now - self.t, 1e-9)
        mean = (done - self.start) / max(now - self.t0, 1e-9)
        self.t, self.last = now, done
        left = self.total - done if self.total is not None else None
        return rate, max(left, 0) / mean if left is not None and mean > 0 else None

    def due(self):
        """Whether the line is due: a second after the last on a terminal, LOG_SECONDS in a log file."""
        return time.monotonic() - self.shown >= (1 if self.tty else self.LOG_SECONDS)

    def show(self, text, final=False):
        """text as the progress line: redrawn in place on a terminal, a line of its own in a log file."""
        self.shown = time.monotonic()
        end = "\n" if final or not self.tty else ""
        print("\r" + text.ljust(100) if self.tty else text, end=end, file=sys.stderr, flush=True)


def time_calls(fn, calls=1, seconds=0.0, warmup=1, sync=None):
    """Seconds per call of fn(), the timing loop of every benchmark of wall-clock time (GPU kernels are timed with
    triton.testing.do_bench instead): `warmup` untimed calls (compilation, allocator, autotuning), then at least
    `calls` calls and `seconds` seconds. sync() waits for queued device work (torch.cuda.synchronize)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < calls or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        if n >= calls:
            sync()  # the clock is read after the device has caught up
    return (time.perf_counter() - t0) / n


class _Recorder:

    """A file object that remembers the OSError its write raised: libraries that write through it (torch.save,
    Pillow) may replace the error by their own ("unexpected pos"), which would hide a full disk."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, b):
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def lock_directory(path, flag=None):
    """Hold an exclusive lock on the folder `path` (given by `flag`, if one) for as long as this process keeps the
    returned file open: a second process is refused in one line naming the holder's PID. The lock is a POSIX record
    lock (lockf), which the kernel ties to the process that took it: it ends with that process however it ends (kill
    -9 too), whatever its children do (loader workers, forked with the file open, do not hold it), and never needs
    clearing by hand. Where the file system has no locks (some network file systems), a warning says so once and the
    run goes on unguarded. Creating the lock file is also the first write into `path`, so a folder that cannot be
    written to is found here. Holding it, the temp files of a write that a kill cut short are deleted."""
    lock = os.path.join(path, ".lock")
    try:
        os.makedirs(path, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise write_error(lock if os.path.isdir(path) else path, e, flag) from e
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # held by another process: EAGAIN or EACCES, as the system says it
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its PID yet"
        f.close()
        raise UserError(f"{flag + ' ' if flag else ''}{path} is in use by another run ({holder}); wait for it to end, "
                        "or choose another folder") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise write_error(lock, e, flag) from e
        if path not in _UNLOCKED:
            _UNLOCKED.add(path)
            print(f"warning: {flag + ' ' if flag else ''}{path}: this file system does not lock files ({e.strerror}),"
                  " so nothing keeps a second run out of it: make sure that one runs at a time", file=sys.stderr)
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    clear_atomic_temps(path)  # nobody else writes here now
    return f


_UNLOCKED = set()  # folders whose file system refused a lock: warned about once


def write_error(path, e, flag=None):
    """The UserError for a failed write of `path` (given by `flag`, if one): one line with the cause and what to do."""
    advice = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
              errno.EFBIG: "the file is larger than this system allows", errno.EROFS: "choose a writable location",
              errno.EACCES: "choose a location you may write to", errno.EPERM: "choose a location you may write to"}
    return UserError(f"{flag + ': ' if flag else ''}cannot write {path}: {e.strerror or e}; "
                     f"{advice.get(e.errno, 'check the location')}")


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_kw):
    """Open a temp file beside `path`; when the block ends without an error, fsync it and rename it over `path`,
    so that readers find the old file or the new one, never a part. On any error the temp file is removed and the
    old file stays; a failed write (read-only, full disk, quota, permissions) is a UserError naming path and cause."""
    tmp, f, writing = f"{path}.tmp{os.getpid()}", None, True
    try:
        with open(tmp, mode, **open_kw) as raw:
            f, writing = _Recorder(raw), False
            yield f  # what fails in here, but for f's writes, is the block's error (reading its input, say)
            writing = True
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as e:
        if f is not None and f.error is not None:
            raise write_error(path, f.error) from e
        if writing and isinstance(e, OSError):
            raise write_error(path, e) from e
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def clear_atomic_temps(folder, name=".+"):
    """Delete the temp files that atomic_write left in folder (for the files matching the regex `name`) when a process
    was killed mid-write. Only for a holder of the lock that keeps every other writer out."""
    for entry in os.listdir(folder):
        if re.fullmatch(f"(?:{name})" + r"\.tmp\d+", entry) and os.path.isfile(os.path.join(folder, entry)):
            os.remove(os.path.join(folder, entry))


def import_transformers():
    """The transformers module (5.x), which stage one and the Hugging Face export need and nothing else: a UserError
    saying what to install where it is missing."""
    # transformers imports Hugging Face's package named `kernels` when it is first imported, and this repository's own
    # kernels/ shadows it: the repository folder is on sys.path whenever a command runs from it, and alip may have
    # imported ours. So transformers is imported, with the module that binds Hugging Face's names, while the folder is
    # off sys.path and our package out of sys.modules; then both are put back, and each side keeps its own `kernels`.
    root = os.path.dirname(os.path.abspath(__file__))
    path, before = sys.path[:], {n: m for n, m in sys.modules.items() if n == "kernels" or n.startswith("kernels.")}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    for name in before:
        del sys.modules[name]
    try:
        import transformers
        import transformers.integrations.hub_kernels  # noqa: F401
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "transformers":
            raise UserError("this needs the transformers package, which is not installed: "
                            "pip install transformers") from e
        raise UserError(f"transformers does not import ({e}); pip install -U transformers") from e
    finally:
        sys.path[:] = path
        sys.modules.pop("kernels", None)
        sys.modules.update(before)
    if int(transformers.__version__.split(".")[0]) < 5:
        raise UserError(f"this needs transformers 5 or newer, this is {transformers.__version__}: "
                        "pip install -U transformers")
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; downloads keep theirs
    return transformers


def command_line():
    """The parser of `python data.py COMMAND ...`."""
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    debug = ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    p = sub.add_parser("demo", parents=[debug], help="write the procedural demo dataset")
    p.add_argument("out", help="the folder to write (train/ and test/ shards)")
    p.add_argument("--seed", type=int, default=0, help="of the images and texts")
    p = sub.add_parser("inspect", parents=[debug], help="count usable and skipped samples, show a few")
    p.add_argument("shards", help="directory, glob or brace list of .tar shards")
    p.add_argument("--captions", help="JSONL side file of {key, caption} (default: the shards' own captions)")
    p.add_argument("--missing-caption", choices=("skip", "raw"), default="skip",
                   help="a sample without a caption: skipped, or its raw text as caption")
    p.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    overwrite = ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true",
                           help="replace a non-empty OUT of shards as a whole, once the new shards are complete")
    p = sub.add_parser("make", parents=[debug, overwrite],
                       help="shards from images + a CSV/JSONL table (image, text[, caption])")
    p.add_argument("src", help="the table, or a directory holding one; image paths are relative to the table")
    p.add_argument("out", help="the folder of shards to write")
    p.add_argument("--shard-size", type=positive_int, default=10000, help="samples per shard")
    p = sub.add_parser("add-captions", parents=[debug, overwrite],
                       help="copy shards, adding {key}.syn.txt from a JSONL side file")
    p.add_argument("shards", help="directory, glob or brace list of .tar shards")
    p.add_argument("captions", help="JSONL side file of {key, caption} (caption.py writes one)")
    p.add_argument("out", help="the folder of shards to write")
    p = sub.add_parser("bench", parents=[debug], help="decode + augment images/s")
    p.add_argument("shards", nargs="?", help="shards to read images from (default: none; pass --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="bench on generated 500-px JPEGs")
    p.add_argument("--image-size", type=positive_int, default=224, help="the model's input side")
    p.add_argument("--workers", type=nonnegative_int, default=2, help="loader processes for the loader's rate")
    p.add_argument("--seconds", type=positive_float, default=3.0, help="timed per measurement")
    return parser


def main(argv=None):
    args = command_line().parse_args(argv)
    if args.cmd == "demo":
        t0 = time.perf_counter()
        paths = write_demo(args.out, args.seed)
        print(json.dumps(paths), f"({time.perf_counter() - t0:.1f} s)")
    elif args.cmd == "inspect":
        r = inspect(args.shards, args.captions, args.missing_caption)
        table = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON object alone
        print(f"{r['shards']} shards, {r['samples']} samples, {r['usable']} usable", file=table)
        for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
            print(f"  skipped {reason}: {n}", file=table)
        if r["skipped"].get("duplicate_key"):
            print(f"  {r['skipped']['duplicate_key']} samples have the key of an earlier sample (in their shard or an "
                  "earlier one): a captions file, joined by key, would give them its caption, so training and stage "
                  "one skip them too", file=table)
        print("coverage: " + ", ".join(f"{k} {v:.1%}" for k, v in r["coverage"].items()), file=table)
        for s in r["previews"]:
            print(f"  {s['key']} {s['size'][0]}x{s['size'][1]} text={s['text']!r} caption={s['caption']!r}", file=table)
        if args.json:
            print(json.dumps(r))
    elif args.cmd == "make":
        print(json.dumps(make_shards(args.src, args.out, args.shard_size, args.overwrite)))
    elif args.cmd == "add-captions":
        print(json.dumps(add_captions(args.shards, args.captions, args.out, args.overwrite)))
    elif args.cmd == "bench":
        if not args.synthetic and not args.shards:
            raise UserError("bench needs SHARDS or --synthetic (see data.py bench --help)")
        with tempfile.TemporaryDirectory() as tmp:
            if args.synthetic:
                _synthetic_jpegs(tmp)
            r = bench(tmp if args.synthetic else args.shards, args.image_size, args.workers, seconds=args.seconds)
        print(f"{os.cpu_count()} CPUs; image size {r['image_size']}; {r['images']} images, "
              f"mean {r['mean_pixels'] / 1e3:.0f} kpixels")
        print(f"per core: baseline {r['baseline_per_core']:.0f} img/s, ours {r['ours_per_core']:.0f} img/s "
              f"({r['speedup']:.2f}x)")
        print(f"loader with {args.workers} workers: {r['loader_images_per_s']:.0f} img/s "
              f"(on {os.cpu_count()} CPUs); ~{r['workers_for_4000_per_s']} workers for 4000 img/s at this rate")
        print(json.dumps(r))


if __name__ == "__main__":
    run_command(main)
