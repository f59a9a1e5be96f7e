"""The model where CLIP models are used: checkpoints that open_clip reads, eval.py export's open_clip state dict and
Hugging Face folder, and --precision on the evaluation commands. What open_clip builds comes from open_clip itself,
recorded once in tests/data/openclip_export.json; what transformers does comes from transformers."""
import contextlib
import html
import importlib.util
import io
import json
import os
import resource
import signal
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import ftfy
import numpy as np
import pytest
import torch
from PIL import Image

import alip
import data
import eval as ev

with open(os.path.join(os.path.dirname(__file__), "data", "openclip_export.json")) as f:
    OPEN_CLIP = json.load(f)
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


def report(a, b):
    d = (a.double() - b.double()).abs()
    return f"max diff {d.max().item():.3e}, mean diff {d.mean().item():.3e}"


def assert_close(a, b, atol):
    torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: report(a, b))


def randomized(quick_gelu=False):
    """`tiny` with every parameter moved off its initial value: norms at 1 and biases at 0 would hide a mixed-up
    mapping."""
    torch.manual_seed(0)
    model = alip.create_model("tiny", quick_gelu)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_run(model, out):
    """alip.save's checkpoint of model in out, after an optimizer step that leaves the weights as they are (no
    gradient, no weight decay) but puts the optimizer's state in the file."""
    optimizer = alip.configure_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    run = SimpleNamespace(raw_model=model, world_size=1, master=True, optimizer=optimizer,
                          scheduler=alip.cosine_schedule(optimizer, 1, 10),
                          scaler=torch.amp.GradScaler("cpu", enabled=False),
                          objective=SimpleNamespace(gates=alip.Gates()), loader=SimpleNamespace(state_dict=dict),
                          args=SimpleNamespace(output=str(out), keep=1), log=lambda line: None, segments=[])
    os.makedirs(out, exist_ok=True)
    alip.save(run, 1)
    return alip.latest_checkpoint(str(out))


def main(argv):
    ev.main([str(a) for a in argv], load_model=alip.load_model, presets=alip.PRESETS)


def features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def random_images(sizes, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


TEXTS = ["a photo of a cat", "A  Photo\tOF a DOG!!", "wow ! great !!!", "don't stop, they'll see", "café naïve",
         "emoji 😀🎉", "日本語のテキスト", "12345 and 3.14", "<start_of_text> in a caption", "", " spaces around ",
         "long " * 100]
S = alip.PRESETS["tiny"].image_size


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_checkpoint_holds_the_weights_where_open_clip_looks_and_only_once(tmp_path):
    model = randomized()
    path = save_run(model, tmp_path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # as open_clip's load_checkpoint reads it
    sd = ckpt["state_dict"]
    assert {k: list(v.shape) for k, v in sd.items()} == OPEN_CLIP["exports"]["tiny"]["keys"]
    fresh = alip.create_model("tiny").eval()
    fresh.load_state_dict(sd)
    images, tokens = data.normalize(torch.randint(0, 256, (2, 3, S, S))), data.tokenize(TEXTS[:3])
    for a, b in zip(features(fresh, images, tokens), features(model, images, tokens)):
        assert torch.equal(a, b)
    del ckpt["state_dict"]
    once = io.BytesIO()
    torch.save(ckpt, once)
    weights = sum(v.numel() * v.element_size() for v in sd.values())
    assert os.path.getsize(path) - len(once.getvalue()) < 4096 < weights, (os.path.getsize(path), len(once.getvalue()))


def test_a_checkpoint_made_before_state_dict_loads_and_exports(tmp_path):
    model = randomized()
    os.makedirs(tmp_path / "run")
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 3},
               tmp_path / "run" / "ckpt-00000003.pt")  # the weights under "model" only
    loaded = alip.load_model(str(tmp_path / "run"))
    main(["export", tmp_path / "run", "--format", "open_clip", "--out", tmp_path / "x.pt"])
    back = alip.load_model(str(tmp_path / "x.pt"), "tiny")
    images, tokens = data.normalize(torch.randint(0, 256, (2, 3, S, S))), data.tokenize(TEXTS[:3])
    for ours, again in ((model, loaded), (model, back)):
        for a, b in zip(features(ours, images, tokens), features(again, images, tokens)):
            assert torch.equal(a, b)


# --- open_clip -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPEN_CLIP["models"]))
def test_open_clip_names_its_model_of_our_architecture(name):
    built = OPEN_CLIP["models"][name]  # open_clip.create_model(name)'s heads and activation
    preset = name.removesuffix("-quickgelu")
    with torch.device("meta"):
        model = alip.create_model(preset, quick_gelu=name != preset)
    assert ev.open_clip_name(model.config, alip.PRESETS) == name
    assert (model.config.vision_heads, model.config.text_heads) == (built["vision_heads"], built["text_heads"])
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == built["act"]
    assert ev.open_clip_name(replace(model.config, text_heads=4), alip.PRESETS) is None  # same shapes, not open_clip's
    assert ev.open_clip_name(alip.PRESETS["tiny"], alip.PRESETS) is None


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_export_is_what_open_clip_builds_and_comes_back_equal(quick_gelu, tmp_path, capsys):
    model = randomized(quick_gelu)
    save_run(model, tmp_path / "run")
    out, config = tmp_path / "alip-tiny.pt", tmp_path / "alip-tiny.json"
    main(["export", tmp_path / "run", "--format", "open_clip", "--out", out])
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"  open_clip.add_model_config({str(config)!r})",
        f"  model = open_clip.create_model('alip-tiny', pretrained={str(out)!r})"]
    built = OPEN_CLIP["exports"]["tiny-quickgelu" if quick_gelu else "tiny"]
    sd = torch.load(out, weights_only=True)
    assert type(sd) is dict and all(v.dtype == torch.float32 for v in sd.values())  # a bare fp32 state dict
    assert {k: list(v.shape) for k, v in sd.items()} == built["keys"]
    with open(config) as f:
        assert json.load(f) == built["config"]  # the config open_clip built the model of `built` from
    block = model.visual.transformer.resblocks[0]
    assert (model.config.vision_heads, model.config.text_heads, type(block.mlp.gelu).__name__) == (
        built["vision_heads"], built["text_heads"], built["act"])
    back = alip.load_model(str(out), "tiny", quick_gelu)
    images, tokens = data.normalize(torch.randint(0, 256, (3, 3, S, S))), data.tokenize(TEXTS)
    for a, b in zip(features(model, images, tokens), features(back, images, tokens)):
        assert_close(a, b, 1e-7)


# --- Hugging Face --------------------------------------------------------------------------------------------

@needs_transformers
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_export_loads_in_transformers_with_our_features_and_token_ids(quick_gelu, tmp_path):
    model = randomized(quick_gelu)
    save_run(model, tmp_path / "run")
    out = tmp_path / "hf"
    main(["export", tmp_path / "run", "--format", "hf", "--out", out])
    transformers = data.import_transformers()
    # use_kernels=False: this repository's kernels/ shadows the Hugging Face package that the hub kernels need
    hf = transformers.CLIPModel.from_pretrained(str(out), use_kernels=False).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(out), backend="pil")
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == (
        "quick_gelu" if quick_gelu else "gelu")

    # Images of sizes whose centre crop starts where ours does (see test_hf_processor_crops_a_pixel_off below).
    images = random_images([(S, S), (48, 40), (45, 60), (100, 37), (50, 35), (20, 14)])
    x = torch.stack([data.eval_transform(S)(img) for img in images])  # (6, 3, S, S)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert_close(pixels, x, 1e-6)
    tokens = data.tokenize(TEXTS)  # (12, 77)
    enc = processor(text=TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    ours_x, ours_t = features(model, x, tokens)
    with torch.no_grad():
        assert_close(hf.get_image_features(pixel_values=x).pooler_output, ours_x, 1e-5)
        assert_close(hf.get_image_features(pixel_values=pixels).pooler_output, ours_x, 1e-5)
        assert_close(hf.get_text_features(input_ids=tokens).pooler_output, ours_t, 1e-5)
        assert_close(hf.get_text_features(**enc).pooler_output, ours_t, 1e-5)
        assert_close(hf.logit_scale, model.logit_scale, 0)

    # Token ids: ours through EOT; after it HF's pad token, EOT, which the attention mask hides.
    ids, upto = enc["input_ids"], torch.arange(77)[None] <= tokens.argmax(-1)[:, None]
    assert torch.equal(ids[upto], tokens[upto]) and (ids[~upto] == data.EOT).all()
    assert torch.equal(enc["attention_mask"].bool(), upto)
    # Text that ftfy or HTML unescaping changes: ours once it is cleaned the way our tokenizer cleans it.
    messy = ["don’t stop", "fish &amp; chips &amp;amp; peas", "ｆｕｌｌ ｗｉｄｔｈ", "cafÃ© mojibake", "ﬁne ligature"]
    cleaned = [html.unescape(html.unescape(ftfy.fix_text(t))) for t in messy]
    ids = processor(text=cleaned, padding="max_length", return_tensors="pt")["input_ids"]
    tokens = data.tokenize(messy)
    upto = torch.arange(77)[None] <= tokens.argmax(-1)[:, None]
    assert torch.equal(ids[upto], tokens[upto])


@needs_transformers
def test_hf_processor_crops_a_pixel_off_where_the_rounding_differs(tmp_path):
    """The residual difference the README states: where the resized image is 3 (mod 4) pixels longer than the crop,
    our centre crop (torchvision's: round half to even) starts one pixel later than transformers' (floor)."""
    main(["export", save_run(randomized(), tmp_path / "run"), "--format", "hf", "--out", tmp_path / "hf"])
    processor = data.import_transformers().CLIPProcessor.from_pretrained(str(tmp_path / "hf"), backend="pil")
    img = random_images([(S + 3, S)])[0]  # resized: S + 3 wide
    ours = data.eval_transform(S)(img)
    theirs = processor(images=[img], return_tensors="pt")["pixel_values"][0]
    assert_close(theirs[:, :, 1:], ours[:, :, :-1], 1e-6)  # theirs from column 1, ours from column 2
    assert (theirs - ours).abs().max() > 0.1


def test_export_refusals_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    save_run(randomized(), tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for argv, message in [(["--format", "hf", "--out", tmp_path / "new"], "--format hf needs the transformers"),
                          (["--format", "open_clip", "--out", tmp_path / "w.json"], "w.json: that is the name of"),
                          (["--format", "onnx", "--out", tmp_path / "x"], "--format"),
                          (["--out", tmp_path / "x"], "--format")]:
        with monkeypatch.context() as m, pytest.raises(data.UserError, match=message) as e:
            m.setitem(sys.modules, "transformers", None)  # what `import` finds for a package that is not installed
            main(["export", tmp_path / "run", *argv])
        assert "\n" not in str(e.value)
    if importlib.util.find_spec("transformers") is not None:
        with pytest.raises(data.UserError, match="taken exists and is not an empty folder"):
            main(["export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "taken"])
    with pytest.raises(ev.EvalError, match="^nope: no such file"):
        main(["export", "nope", "--format", "open_clip", "--out", tmp_path / "x.pt"])
    assert sorted(os.listdir(tmp_path)) == ["run", "taken"] and os.listdir(tmp_path / "taken") == ["notes.txt"]


@contextlib.contextmanager
def file_size_limit(size):
    """Writes past `size` bytes fail with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("fmt", ["open_clip", pytest.param("hf", marks=needs_transformers)])
def test_a_failed_export_write_is_one_line_and_leaves_nothing(fmt, tmp_path):
    save_run(randomized(), tmp_path / "run")
    out = tmp_path / ("x.pt" if fmt == "open_clip" else "hf")
    with file_size_limit(2 ** 20), pytest.raises(data.UserError, match=f"cannot write {out}") as e:
        main(["export", tmp_path / "run", "--format", fmt, "--out", out])
    assert "\n" not in str(e.value) and "File too large" in str(e.value)
    assert os.listdir(tmp_path) == ["run"]


# --- --precision ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    images = random_images([(40, 30)] * 8)
    for i, img in enumerate(images):
        os.makedirs(root / "folder" / f"class{i % 2}", exist_ok=True)
        img.save(root / "folder" / f"class{i % 2}" / f"{i}.png")
    samples = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append((f"{i:05d}", {"png": buf.getvalue(), "txt": f"picture number {i}".encode()}))
    os.makedirs(root / "shards")
    data.write_tar(str(root / "shards" / "00000.tar"), samples)
    run = root / "run"
    save_run(randomized(), run)
    return {"run": str(run), "folder": str(root / "folder"), "shards": str(root / "shards")}


COMMANDS = {"zeroshot": ["--dataset", "{folder}", "--templates", "simple"],
            "retrieval": ["--dataset", "{shards}"],
            "linear-probe": ["--train", "{folder}", "--test", "{folder}"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_precision_is_applied_and_recorded_on_every_evaluation_command(command, datasets, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--precision {fp32,bf16,fp16}" in capsys.readouterr().out.replace("\n", " ")
    seen = []
    autocast = ev.autocast
    monkeypatch.setattr(ev, "autocast", lambda device, dtype: seen.append(dtype) or autocast(device, dtype))
    argv = [command, "--checkpoint", datasets["run"], *[a.format(**datasets) for a in COMMANDS[command]],
            "--json", "--workers", "0", "--device", "cpu"]
    for flag, dtype in [([], None), (["--precision", "bf16"], torch.bfloat16),
                        (["--precision", "fp16"], torch.float16)]:
        seen.clear()
        main(argv + flag)
        result = json.loads(capsys.readouterr().out)
        assert result["precision"] == (flag[1] if flag else "fp32")
        assert seen and set(seen) == {dtype}, seen


def test_precision_help_gives_the_default_and_its_reason(capsys):
    with pytest.raises(SystemExit):
        main(["zeroshot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fp32 is the ALIP authors' protocol" in text and "(default: fp32)" in text
    with pytest.raises(data.UserError, match="--precision"):
        main(["zeroshot", "--checkpoint", "x", "--dataset", "y", "--precision", "tf32"])
