"""data.decode_image: every pixel format Pillow opens decodes to its picture, or is skipped and counted.

Each image is built here from random values, encoded in its mode and format, decoded, and compared with the RGB
a viewer shows on a white page, computed here from the values. Lossless formats must match exactly. JPEGs hold
flat 16-px patches on 8-px block boundaries, so each block's AC terms are zero and only the DC term's
quantisation and the YCbCr round trip remain (measured: at most 1 level at quality 95): bound JPEG_BOUND."""
import collections
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import data
import eval as evaluation

JPEG_BOUND = 2


def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(pixels, depth, colour_type, *chunks):
    """A PNG written by hand, for what Pillow cannot write: 2-bit gray, 16-bit colour, 16-bit transparency.
    pixels: (H, W) or (H, W, C) integers; chunks: (type, data) placed before the image data."""
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    if depth < 8:
        bits = (rows[..., None] >> np.arange(depth - 1, -1, -1)) & 1  # most significant first
        rows = np.packbits(bits.reshape(h, -1).astype(np.uint8), axis=-1)
    body = b"".join(b"\0" + row.astype(">u2" if depth == 16 else np.uint8).tobytes() for row in rows)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + b"".join(chunk(k, d) for k, d in chunks)
            + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))


def _over_white(rgb, alpha):
    """What a viewer shows on a white page: c * a/255 + 255 * (1 - a/255), rounded (never a tie: 255 is odd)."""
    a = np.asarray(alpha, np.float64)[..., None] / 255
    return np.rint(np.asarray(rgb, np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def _gray(v):
    return np.repeat(np.asarray(v, np.uint8)[..., None], 3, -1)


def _patches(name, channels, rows=3, cols=4, side=16):
    """rows x cols flat patches of random colours, side px each."""
    return _rng(name).integers(0, 256, (rows, cols, channels), dtype=np.uint8).repeat(side, 0).repeat(side, 1)


# --- the cases: name -> () -> (encoded bytes, expected (H, W, 3) uint8, tolerance)

SIZE = (12, 17)  # odd sizes, so that no row packs evenly into bytes


def gray1(fmt):
    bits = _rng("gray1" + fmt).integers(0, 2, SIZE).astype(bool)
    return _encode(Image.fromarray(bits), fmt), _gray(bits * 255), 0


def gray2_png(transparent):
    v = _rng("gray2").integers(0, 4, SIZE)
    chunks = [(b"tRNS", struct.pack(">H", 2))] if transparent else []
    want = _gray(v * 85)  # 2-bit levels 0..3 are 0, 85, 170, 255
    if transparent:
        want[v == 2] = 255
    return _png(v, 2, 0, *chunks), want, 0


def gray8(fmt):
    if fmt == "JPEG":
        v = _patches("gray8", 1)[..., 0]
        return _encode(Image.fromarray(v), fmt, quality=95), _gray(v), JPEG_BOUND
    v = _rng("gray8" + fmt).integers(0, 256, SIZE, dtype=np.uint8)
    if fmt == "PGM":
        return b"P5 %d %d 255\n" % (SIZE[1], SIZE[0]) + v.tobytes(), _gray(v), 0
    return _encode(Image.fromarray(v), fmt), _gray(v), 0


def gray8_png_transparent():
    v = _rng("gray8t").integers(0, 256, SIZE, dtype=np.uint8)
    key = int(v[3, 5])
    want = _gray(v)
    want[v == key] = 255
    return _encode(Image.fromarray(v), "PNG", transparency=key), want, 0


def gray16(fmt):
    v = _rng("gray16" + fmt).integers(0, 65536, SIZE).astype(np.uint16)
    want = _gray(v >> 8)
    if fmt == "PGM":
        return b"P5 %d %d 65535\n" % (SIZE[1], SIZE[0]) + v.astype(">u2").tobytes(), want, 0
    if fmt == "TIFF big-endian":
        return _encode(Image.frombytes("I;16B", SIZE[::-1], v.astype(">u2").tobytes()), "TIFF"), want, 0
    return _encode(Image.fromarray(v), fmt), want, 0


def gray16_png_transparent():
    v = _rng("gray16t").integers(0, 65536, SIZE).astype(np.uint16)
    v[4, 4] = v[7, 9] = key = 40000
    v[5, 5] = key + 1  # same high byte, another level: stays opaque
    want = _gray(v >> 8)
    want[v == key] = 255
    return _png(v, 16, 0, (b"tRNS", struct.pack(">H", key))), want, 0


def rgb8(fmt):
    if fmt == "JPEG":
        v = _patches("rgb8", 3)
        return _encode(Image.fromarray(v), fmt, quality=95, subsampling=0), v, JPEG_BOUND
    v = _rng("rgb8" + fmt).integers(0, 256, SIZE + (3,), dtype=np.uint8)
    if fmt == "PPM":
        return b"P6 %d %d 255\n" % (SIZE[1], SIZE[0]) + v.tobytes(), v, 0
    return _encode(Image.fromarray(v), fmt, **({"lossless": True} if fmt == "WEBP" else {})), v, 0


def rgb8_png_transparent():
    v = _rng("rgb8t").integers(0, 256, SIZE + (3,), dtype=np.uint8)
    key = tuple(int(c) for c in v[2, 2])
    v[8, 1] = v[2, 2]
    want = v.copy()
    want[(v == key).all(-1)] = 255
    return _encode(Image.fromarray(v), "PNG", transparency=key), want, 0


def rgb16_png():
    v = _rng("rgb16").integers(0, 65536, SIZE + (3,)).astype(np.uint16)
    return _png(v, 16, 2), (v >> 8).astype(np.uint8), 0


def rgba8(fmt):
    v = _rng("rgba8" + fmt).integers(0, 256, SIZE + (4,), dtype=np.uint8)
    v[0, :4, 3] = (0, 255, 1, 254)  # the ends of the alpha range, whatever the draw
    raw = _encode(Image.fromarray(v), fmt, **({"lossless": True, "exact": True} if fmt == "WEBP" else {}))
    return raw, _over_white(v[..., :3], v[..., 3]), 0


def rgba16_png():
    v = _rng("rgba16").integers(0, 65536, SIZE + (4,)).astype(np.uint16)
    hi = v >> 8
    return _png(v, 16, 6), _over_white(hi[..., :3], hi[..., 3]), 0


def gray_alpha(depth):
    v = _rng(f"la{depth}").integers(0, 1 << depth, SIZE + (2,)).astype(np.uint16 if depth == 16 else np.uint8)
    hi = v >> 8 if depth == 16 else v
    return _png(v, depth, 4), _over_white(_gray(hi[..., 0]), hi[..., 1]), 0


def palette(fmt, alpha=False):
    rng = _rng("palette" + fmt + str(alpha))
    colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, SIZE).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(colours.tobytes())
    if not alpha:
        return _encode(img, fmt), colours[index], 0
    if fmt == "PNG":  # an alpha for every palette entry
        alphas = rng.integers(0, 256, 16, dtype=np.uint8)
        return _encode(img, fmt, transparency=alphas.tobytes()), _over_white(colours[index], alphas[index]), 0
    want = colours[index]  # GIF: one transparent entry
    want[index == 5] = 255
    return _encode(img, fmt, transparency=5), want, 0


def cmyk(fmt):
    if fmt == "JPEG":
        v = _patches("cmyk", 4)
        raw = _encode(Image.fromarray(v, "CMYK"), fmt, quality=95, subsampling=0)
        tolerance = JPEG_BOUND
    else:
        v = _rng("cmyk").integers(0, 256, SIZE + (4,), dtype=np.uint8)
        raw, tolerance = _encode(Image.fromarray(v, "CMYK"), fmt), 0
    c = v.astype(np.int64)
    # The same conversion written out: R = (255 - C)(255 - K) / 255, rounded.
    want = ((255 - c[..., :3]) * (255 - c[..., 3:]) + 127) // 255
    return raw, want.astype(np.uint8), tolerance


def ycbcr(fmt):
    v = _patches("ycbcr", 3) if fmt == "JPEG" else _rng("ycbcr").integers(0, 256, SIZE + (3,), dtype=np.uint8)
    y, cb, cr = (v[..., i].astype(np.float64) for i in range(3))
    # JPEG's (JFIF's) full-range BT.601; Pillow's fixed-point arithmetic truncates, 1 level below at most.
    want = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1)
    want = np.rint(want.clip(0, 255)).astype(np.uint8)
    img = Image.merge("YCbCr", [Image.fromarray(v[..., i]) for i in range(3)])
    if fmt == "JPEG":
        return _encode(img, fmt, quality=95, subsampling=0), want, JPEG_BOUND
    return _encode(img, fmt), want, 1


def lab_tiff():
    v = _rng("lab").integers(0, 256, SIZE + (3,), dtype=np.uint8)
    v[0, :3] = ((255, 128, 128), (0, 128, 128), (128, 128, 128))  # white, black, mid gray
    # Pillow's LAB: L* = L * 100/255, a* = a - 128, b* = b - 128 (TIFF stores a*, b* signed), white D50.
    L, a, b = v[..., 0] / 255 * 100, v[..., 1] - 128.0, v[..., 2] - 128.0
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    eps, kappa = 216 / 24389, 24389 / 27
    def inverse(f):
        return np.where(f ** 3 > eps, f ** 3, (116 * f - 16) / kappa)
    xyz = np.stack([inverse(fx), np.where(L > kappa * eps, fy ** 3, L / kappa), inverse(fz)], -1)
    xyz *= (0.9642, 1.0, 0.8249)  # D50
    bradford_d50_to_d65 = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                                    [0.0122982, -0.0204830, 1.3299098]])
    xyz_to_srgb = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                            [0.0556434, -0.2040259, 1.0572252]])
    linear = (xyz @ bradford_d50_to_d65.T @ xyz_to_srgb.T).clip(0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    img = Image.merge("LAB", [Image.fromarray(v[..., i]) for i in range(3)])
    return _encode(img, "TIFF"), np.rint(srgb * 255).astype(np.uint8), 1  # 1: littleCMS's float rounding


def animated(fmt):
    """Two frames; the first is the picture."""
    rng = _rng("animated" + fmt)
    if fmt == "GIF":
        colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)
        frames = [Image.fromarray(rng.integers(0, 16, SIZE).astype(np.uint8), "P") for _ in range(2)]
        for f in frames:
            f.putpalette(colours.tobytes())
        want, tolerance = colours[np.asarray(frames[0])], 0
    elif fmt == "MPO":  # a JPEG with a second picture, as phones write them
        frames = [Image.fromarray(_patches(f"mpo{i}", 3)) for i in range(2)]
        want, tolerance = np.asarray(frames[0]), JPEG_BOUND
    else:
        frames = [Image.fromarray(rng.integers(0, 256, SIZE + (3,), dtype=np.uint8)) for _ in range(2)]
        want, tolerance = np.asarray(frames[0]), 0
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95, "subsampling": 0} if fmt == "MPO" else {}
    raw = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    assert Image.open(io.BytesIO(raw)).n_frames == 2
    return raw, want, tolerance


CASES = {
    "1-bit gray PNG": lambda: gray1("PNG"), "1-bit gray TIFF": lambda: gray1("TIFF"),
    "2-bit gray PNG": lambda: gray2_png(False), "2-bit gray PNG, transparent level": lambda: gray2_png(True),
    "8-bit gray PNG": lambda: gray8("PNG"), "8-bit gray PGM": lambda: gray8("PGM"),
    "8-bit gray JPEG": lambda: gray8("JPEG"), "8-bit gray PNG, transparent level": gray8_png_transparent,
    "16-bit gray PNG": lambda: gray16("PNG"), "16-bit gray TIFF": lambda: gray16("TIFF"),
    "16-bit gray TIFF big-endian": lambda: gray16("TIFF big-endian"), "16-bit gray PGM": lambda: gray16("PGM"),
    "16-bit gray PNG, transparent level": gray16_png_transparent,
    "8-bit RGB PNG": lambda: rgb8("PNG"), "8-bit RGB TIFF": lambda: rgb8("TIFF"), "8-bit RGB BMP": lambda: rgb8("BMP"),
    "8-bit RGB PPM": lambda: rgb8("PPM"), "8-bit RGB WebP lossless": lambda: rgb8("WEBP"),
    "8-bit RGB JPEG": lambda: rgb8("JPEG"), "8-bit RGB PNG, transparent colour": rgb8_png_transparent,
    "16-bit RGB PNG": rgb16_png,
    "8-bit RGBA PNG": lambda: rgba8("PNG"), "8-bit RGBA TIFF": lambda: rgba8("TIFF"),
    "8-bit RGBA WebP lossless": lambda: rgba8("WEBP"), "16-bit RGBA PNG": rgba16_png,
    "8-bit gray+alpha PNG": lambda: gray_alpha(8), "16-bit gray+alpha PNG": lambda: gray_alpha(16),
    "palette PNG": lambda: palette("PNG"), "palette GIF": lambda: palette("GIF"),
    "palette BMP": lambda: palette("BMP"), "palette TIFF": lambda: palette("TIFF"),
    "palette PNG, alpha per entry": lambda: palette("PNG", alpha=True),
    "palette GIF, transparent entry": lambda: palette("GIF", alpha=True),
    "CMYK TIFF": lambda: cmyk("TIFF"), "CMYK JPEG": lambda: cmyk("JPEG"),
    "YCbCr TIFF": lambda: ycbcr("TIFF"), "YCbCr JPEG": lambda: ycbcr("JPEG"),
    "LAB TIFF": lab_tiff,
    "animated GIF": lambda: animated("GIF"), "animated PNG": lambda: animated("PNG"),
    "animated WebP": lambda: animated("WEBP"), "MPO (JPEG)": lambda: animated("MPO"),
}


def _difference(img, want):
    got = np.asarray(img)
    assert img.mode == "RGB" and got.shape == want.shape, (img.mode, got.shape, want.shape)
    return np.abs(got.astype(np.int64) - want).max()


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_decodes_to_its_picture(name):
    raw, want, tolerance = CASES[name]()
    assert want.min() < 100 and want.max() > 155, "the picture spans the range"
    img = data.decode_image(raw)
    diff = _difference(img, want)
    assert diff <= tolerance, f"{name}: max difference {diff} > {tolerance}"
    assert np.array_equal(np.asarray(evaluation._open_image(raw)), np.asarray(img))  # evaluation decodes alike


# EXIF 2.3's orientations as the operation that shows the stored picture upright.
DISPLAY = {1: lambda s: s, 2: np.fliplr, 3: lambda s: np.rot90(s, 2), 4: np.flipud,
           5: lambda s: np.rot90(np.fliplr(s), 1),  # mirrored, then turned 270 degrees clockwise
           6: lambda s: np.rot90(s, -1),  # turned 90 degrees clockwise
           7: lambda s: np.rot90(np.fliplr(s), -1),  # mirrored, then turned 90 degrees clockwise
           8: lambda s: np.rot90(s, 1)}  # turned 270 degrees clockwise


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_shows_jpegs_upright(orientation):
    stored = _patches(f"exif{orientation}", 3, rows=3, cols=5)  # 48 x 80: a quarter turn shows in the shape
    plain = _encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0)
    tagged = _encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=_exif(orientation))
    upright = DISPLAY[orientation](stored)
    got = data.decode_image(tagged)
    assert _difference(got, upright) <= JPEG_BOUND
    # The same encoded pixels without the tag, turned by numpy: exact.
    assert np.array_equal(np.asarray(got), DISPLAY[orientation](np.asarray(data.decode_image(plain))))


def test_exif_orientation_after_draft_decoding():
    """Draft decoding at 1/2 scale, then the quarter turn: the training minimum holds for the upright picture."""
    stored = _patches("draft", 3, rows=4, cols=6, side=32)  # 128 x 192
    min_side = data.train_min_side(32)  # 43: 192 // 43 and 128 // 43 allow a 1/2 scale, not 1/4
    plain = _encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0)
    tagged = _encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=_exif(6))
    got = data.decode_image(tagged, min_side)
    assert got.size == (64, 96) and min(got.size) >= min_side
    assert np.array_equal(np.asarray(got), np.rot90(np.asarray(data.decode_image(plain, min_side)), -1))
    assert _difference(got, np.rot90(stored[::2, ::2], -1)) <= JPEG_BOUND


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_in_other_formats(fmt):
    stored = _rng("orient" + fmt).integers(0, 256, SIZE + (3,), dtype=np.uint8)
    kw = {"TIFF": {"tiffinfo": {0x0112: 6}}, "WEBP": {"exif": _exif(6), "lossless": True}, "PNG": {"exif": _exif(6)}}
    got = data.decode_image(_encode(Image.fromarray(stored), fmt, **kw[fmt]))
    assert np.array_equal(np.asarray(got), np.rot90(stored, -1))


def test_a_damaged_exif_block_leaves_the_picture_as_stored():
    stored = _rng("damaged exif").integers(0, 256, SIZE + (3,), dtype=np.uint8)
    raw = bytearray(_encode(Image.fromarray(stored), "WEBP", lossless=True, exif=_exif(6)))
    header = raw.index(b"II*\0") if b"II*\0" in raw else raw.index(b"MM\0*")
    raw[header:header + 2] = b"XX"  # byte order unknown: the block cannot be read
    assert np.array_equal(np.asarray(data.decode_image(bytes(raw))), stored)


def _unsupported():
    rng = _rng("unsupported")
    floats = rng.uniform(-1, 3, SIZE).astype(np.float32)
    int32 = rng.integers(-2 ** 31, 2 ** 31, SIZE).astype(np.int32)
    rgb16 = rng.integers(0, 65536, SIZE + (3,)).astype(np.uint16)
    return {"32-bit float TIFF": _encode(Image.fromarray(floats), "TIFF"),
            "32-bit integer TIFF": _encode(Image.fromarray(int32), "TIFF"),
            "16-bit RGB PNG, transparent colour": _png(rgb16, 16, 2, (b"tRNS", rgb16[1, 1].astype(">u2").tobytes()))}


def test_formats_without_a_faithful_rgb_are_skipped_and_counted(tmp_path):
    images = _unsupported()
    for name, raw in images.items():
        with pytest.raises(ValueError, match="^unsupported_mode$"):
            data.decode_image(raw)
        with pytest.raises(ValueError, match=re.escape(evaluation.IMAGE_PROBLEMS["unsupported_mode"])):
            evaluation._open_image(raw)
    good = _encode(Image.fromarray(_patches("good", 3)), "JPEG")
    samples = [(f"{i:06d}", {ext: raw, "txt": b"t", "syn.txt": b"c"})
               for i, (ext, raw) in enumerate([("tif", r) for r in images.values()] + [("jpg", good)])]
    data.write_tar(str(tmp_path / "00000.tar"), samples)
    r = data.inspect(str(tmp_path))
    assert r["usable"] == 1 and r["skipped"] == {"unsupported_mode": len(images)}


def _every_extension():
    """{ext: encoded bytes} for each of data.IMAGE_EXTS, each in its own format."""
    v = _rng("extensions").integers(0, 256, SIZE + (3,), dtype=np.uint8)
    img = Image.fromarray(v)
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF",
               "tif": "TIFF", "tiff": "TIFF", "ppm": "PPM", "pgm": "PPM"}
    assert set(formats) == set(data.IMAGE_EXTS), "a new extension needs a row here"
    return {ext: _encode(img.convert("L") if ext == "pgm" else img.convert("P") if fmt == "GIF" else img, fmt)
            for ext, fmt in formats.items()}


def test_training_reads_every_image_extension_as_evaluation_does(tmp_path):
    images = _every_extension()
    samples = [(f"{i:06d}", {ext: raw, "txt": f"text {ext}".encode(), "syn.txt": b"c"})
               for i, (ext, raw) in enumerate(images.items())]
    data.write_tar(str(tmp_path / "00000.tar"), samples)
    stats = collections.Counter()
    for sample in data.iter_samples(data.expand_shards(str(tmp_path))):
        ext = next(e for e in data.IMAGE_EXTS if e in sample)
        image, _, _ = data.parse_sample(sample, stats)
        assert np.array_equal(np.asarray(image), np.asarray(evaluation._open_image(images[ext]))), ext
    assert not stats
    loader = data.TrainLoader(str(tmp_path), image_size=8, batch_size=len(images), workers=0)
    (x, text, _), = list(loader)
    assert x.shape == (len(images), 3, 8, 8) and not loader.skipped
    want = data.tokenize([f"text {e}" for e in images])
    assert sorted(map(tuple, text.tolist())) == sorted(map(tuple, want.tolist()))
