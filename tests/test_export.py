"""Checkpoints that open_clip reads. What open_clip builds comes from open_clip itself, recorded once in
tests/data/openclip_export.json."""
import io
import json
import os
from types import SimpleNamespace

import torch

import alip
import data

with open(os.path.join(os.path.dirname(__file__), "data", "openclip_export.json")) as f:
    OPEN_CLIP = json.load(f)


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
                          args=SimpleNamespace(output=str(out), keep=1), log=lambda line: None)
    os.makedirs(out, exist_ok=True)
    alip.save(run, 1)
    return alip.latest_checkpoint(str(out))


def features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


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
