"""Model layout and numerics, gates, loss and gradient accumulation, against independent references."""
import copy
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import alip
import data
import kernels

DATA = os.path.join(os.path.dirname(__file__), "data")


def report(a, b):
    d = (a.double() - b.double()).abs()
    return f"max diff {d.max().item():.3e}, mean diff {d.mean().item():.3e}"


# --- model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_state_dict_layout_matches_open_clip(name):
    with open(os.path.join(DATA, "openclip_keys.json")) as f:
        expected = json.load(f)[name]  # keys and shapes of open_clip's CLIP for this config
    with torch.device("meta"):
        model = alip.create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(expected), set(ours) ^ set(expected)
    assert ours == expected


@pytest.mark.parametrize("act", ["gelu", "quickgelu"])
def test_open_clip_weights_give_open_clip_features(act, tmp_path):
    fx = torch.load(os.path.join(DATA, f"openclip_tiny_{act}.pt"), weights_only=True)
    sd = dict(fx["state_dict"])  # the token embedding is rebuilt here to keep the fixture small
    sd["token_embedding.weight"] = torch.from_numpy(
        np.random.RandomState(0).standard_normal((49408, 64)).astype(np.float32) * 0.02)
    path = tmp_path / "openclip.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    # The architecture read off the shapes, which are the tiny preset's; its heads are 64 wide (open_clip's default),
    # the preset's 32: the shapes cannot tell, the flag does.
    model = alip.load_model(str(path), quick_gelu=act == "quickgelu", head_width=64)
    assert model.config.image_size == 32 and model.config.vision_layers == 2 and model.config.text_heads == 1
    with torch.no_grad():
        x, t = model.encode_image(fx["images"]), model.encode_text(fx["tokens"])
    torch.testing.assert_close(x, fx["image_features"], rtol=1e-4, atol=1e-5, msg=lambda m: report(x, fx["image_features"]))
    torch.testing.assert_close(t, fx["text_features"], rtol=1e-4, atol=1e-5, msg=lambda m: report(t, fx["text_features"]))
    wrong = alip.load_model(str(path), quick_gelu=act != "quickgelu", head_width=64)  # the activation must matter
    with torch.no_grad():
        assert not torch.allclose(wrong.encode_image(fx["images"]), fx["image_features"], atol=1e-5)


def _features(model):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, model.config.image_size, model.config.image_size, generator=g)
    tokens = torch.randint(1, 49406, (3, 12), generator=g)
    tokens[:, -1] = 49407  # EOT
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_a_bare_state_dict_of_a_preset_gets_the_presets_heads(tmp_path, capsys):
    torch.manual_seed(0)
    original = alip.create_model("tiny").eval()
    assert original.config.vision_heads == original.config.text_heads == 2  # 32-wide heads: not OpenAI's 64
    torch.save(original.state_dict(), tmp_path / "tiny.pt")
    loaded = alip.load_model(str(tmp_path / "tiny.pt"))
    for a, b in zip(_features(loaded), _features(original)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: report(a, b))
    said = capsys.readouterr().err
    assert "2 vision heads of 32" in said and "preset tiny" in said and "--head-width" in said, said


def test_a_bare_state_dict_of_no_preset_says_which_heads_it_assumed(tmp_path, capsys):
    cfg = alip.ModelConfig(embed_dim=48, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                           vision_heads=4, text_width=32, text_layers=1, text_heads=2)  # 16-wide heads
    torch.manual_seed(0)
    original = alip.CLIP(cfg).eval()
    torch.save({"state_dict": original.state_dict()}, tmp_path / "sd.pt")
    guessed = alip.load_model(str(tmp_path / "sd.pt"))
    said = capsys.readouterr().err
    assert len(said.strip().splitlines()) == 1, said
    assert "1 vision heads of 64 and 1 text heads of 32" in said and "--head-width N" in said, said
    assert not torch.allclose(_features(guessed)[0], _features(original)[0], atol=1e-4)  # the heads matter
    told = alip.load_model(str(tmp_path / "sd.pt"), head_width=16)
    assert (told.config.vision_heads, told.config.text_heads) == (4, 2) and capsys.readouterr().err == ""
    for a, b in zip(_features(told), _features(original)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: report(a, b))
    with pytest.raises(data.UserError, match="--head-width 24 does not divide"):
        alip.load_model(str(tmp_path / "sd.pt"), head_width=24)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_multihead_attention(causal):
    """Several heads (the open_clip fixture above has one): same parameters, same outputs as nn.MultiheadAttention."""
    torch.manual_seed(9)
    ours, mha = alip.Attention(64, 4), torch.nn.MultiheadAttention(64, 4, batch_first=True)
    for p in ours.parameters():  # biases start at zero: randomise them so that their layout is checked too
        torch.nn.init.normal_(p, std=0.1)
    mha.load_state_dict(ours.state_dict())  # strict: the names match
    ours, mha = ours.double(), mha.double()  # two implementations sum in different orders: compare in float64
    x = torch.randn(3, 11, 64, dtype=torch.float64)
    mask = torch.triu(torch.full((11, 11), float("-inf"), dtype=torch.float64), 1) if causal else None
    with torch.no_grad():
        a, b = ours(x, causal), mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: report(a, b))


def random_tokens(lengths, context_length=77):
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for i, n in enumerate(lengths):  # n = tokens between SOT and EOT
        tokens[i, 0] = 49406
        tokens[i, 1:n + 1] = torch.randint(1, 49406, (n,))
        tokens[i, n + 1] = 49407
    return tokens


def test_text_trimming_keeps_features():
    torch.manual_seed(1)
    model = alip.create_model("tiny").double().eval()  # other lengths, other GEMM blockings: float64
    tokens = random_tokens([3, 17, 9, 40])
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        model.trim_text = False
        full = model.encode_text(tokens)
        tokens_noisy_pad = tokens.clone()  # what follows EOT must not matter either (the mask is causal)
        tokens_noisy_pad[:, 60:] = 123
        noisy = model.encode_text(tokens_noisy_pad)
    torch.testing.assert_close(trimmed, full, rtol=1e-12, atol=1e-12, msg=lambda m: report(trimmed, full))
    torch.testing.assert_close(noisy, full, rtol=1e-12, atol=1e-12, msg=lambda m: report(noisy, full))


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(2)
    model = alip.create_model("tiny").double()
    S = model.config.image_size
    images, tokens = torch.randn(3, 3, S, S, dtype=torch.float64), random_tokens([4, 8, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        x, t = model(images, tokens)
        (x.square().sum() + (x @ t.T).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12, msg=lambda m: report(*grads))


def test_no_weight_decay_groups():
    model = alip.create_model("tiny")
    opt = alip.configure_optimizer(model, 1e-3, 0.2, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"logit_scale", "positional_embedding", "visual.class_embedding", "visual.positional_embedding",
            "ln_final.weight", "visual.transformer.resblocks.0.attn.in_proj_bias"} <= no_decay
    assert "token_embedding.weight" not in no_decay and "visual.proj" not in no_decay
    assert opt.param_groups[1]["weight_decay"] == 0 and opt.param_groups[0]["weight_decay"] == 0.2


# --- gates ------------------------------------------------------------------------------------------------

def unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


# The paper's Eq. 1-4 worked out by hand on three samples of 2-d unit vectors, whose similarities are exact:
#   sample   S_tc   S_xt   S_xc
#   1         0.6    0.8   0.96   raw text and caption disagree: the LCG flags it
#   2         1.0    0.8   0.8    they agree: w_s = 1, and no pair weights
#   3        -0.6    0.0   0.8    they contradict: a small w_s, the caption weighted above the raw text
# Eq. 1, before use: H <- 0.99 H + 0.01 mean(S), so from H = 1, H_tc = 0.99 + 0.01 (0.6 + 1 - 0.6) / 3 = 0.9933333.
# Eq. 2: w_s = min(exp(2 (S_tc - H_tc)), 1): sample 1 exp(2 (0.6 - 0.9933333)) = exp(-0.7866667) = 0.4553601, sample
# 2 exp(+0.0133333) clipped to 1. Eq. 3-4 where w_s < 1: w_t = exp(2 (S_xt - H_xt)), H_xt = 0.99 + 0.01 (1.6 / 3) =
# 0.9953333: sample 1 exp(2 (0.8 - 0.9953333)) = 0.6766057. A second step with the same features moves H again.
GATE_X = [[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]
GATE_T = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
GATE_C = [[0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]]
GATE_STEPS = {  # H starts at: [(H_tc, H_xt, H_xc), w_s, w_t, w_c] for steps 1 and 2
    1.0: [((0.9933333333333, 0.9953333333333, 0.9985333333333), (0.4553601354, 1, 0.0413093395),
           (0.6766056537, 1, 0.1366043255), (0.9258281297, 1, 0.6722892049)),
          ((0.9867333333333, 0.9907133333333, 0.9970813333333), (0.4614107353, 1, 0.04185823753),
           (0.6828864626, 1, 0.137872399), (0.9285206422, 1, 0.6742443702))],
    # from H = 0 the similarities lie above their means: sample 3 alone is flagged, and its caption weight, not
    # clipped, exceeds 1 (exp(2 (0.8 - 0.0085333)) = 4.87)
    0.0: [((0.0033333333333, 0.0053333333333, 0.0085333333333), (1, 1, 0.2991929289), (1, 1, 0.9893900205),
           (1, 1, 4.869217922)),
          ((0.0066333333333, 0.0106133333333, 0.0169813333333), (1, 1, 0.2972247576), (1, 1, 0.9789970334),
           (1, 1, 4.787638738))],
}


def gate_features():
    return (torch.tensor(v, dtype=torch.float64) for v in (GATE_X, GATE_T, GATE_C))


@pytest.mark.parametrize("init", [1.0, 0.0])
def test_gates_by_hand_over_two_steps(init):
    gates = alip.Gates(momentum=0.99, gamma=2.0, init=init)
    for H, *weights in GATE_STEPS[init]:
        got = gates(*gate_features())  # float64 features: the gates compute in float64
        assert all(w.dtype == torch.float64 and not w.requires_grad for w in got)
        torch.testing.assert_close((gates.H_tc, gates.H_xt, gates.H_xc), tuple(torch.tensor(h, dtype=torch.float64)
                                                                          for h in H), rtol=0, atol=1e-12)
        for w, want in zip(got, weights):
            torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("mode", ["lcg", "dcg", "none"])
def test_gate_ablations_by_hand(mode):
    """Table 4's ablations: "lcg" keeps the sample weights alone, "dcg" the pair weights alone, "none" neither."""
    _, w_s, w_t, w_c = GATE_STEPS[1.0][0]
    ones = (1, 1, 1)
    want = {"lcg": (w_s, ones, ones), "dcg": (ones, w_t, w_c), "none": (ones, ones, ones)}[mode]
    for w, expected in zip(alip.Gates(mode=mode)(*gate_features()), want):
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)


# --- loss -------------------------------------------------------------------------------------------------

def loss_float64(x, t, s, w, x_all, t_all, offset):
    """mean_i w_i (LSE_j(s x_i.t_j) - s x_i.t_i + LSE_j(s t_i.x_j) - s t_i.x_i) / 2, in float64 loops."""
    x, t, x_all, t_all = (a.double() for a in (x, t, x_all, t_all))
    terms = []
    for i in range(x.shape[0]):
        a = s * (t_all @ x[i])
        b = s * (x_all @ t[i])
        pos = s * (x[i] @ t[i])
        terms.append(w[i] * ((torch.logsumexp(a, 0) - pos) + (torch.logsumexp(b, 0) - pos)) / 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("n,d,scale", [(1, 8, 1.0), (13, 32, 14.3), (50, 24, 100.0)])
def test_contrastive_loss_matches_float64(n, d, scale):
    gen = torch.Generator().manual_seed(n)
    x, t = unit(n, d, gen), unit(n, d, gen)
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    for weight in (None, w):  # float64 through both: matrix form vs per-row loops
        ours = alip.contrastive_loss(x, t, torch.tensor(scale, dtype=torch.float64), weight)
        ref = loss_float64(x, t, scale, torch.ones(n) if weight is None else weight, x, t, 0)
        assert abs(ours.item() - ref.item()) < 1e-12 * max(1, abs(ref.item())), (ours.item(), ref.item())


def test_local_losses_average_to_the_global_loss_and_gradients():
    gen = torch.Generator().manual_seed(5)
    N, D, ranks = 12, 16, 3
    x, t = unit(N, D, gen).requires_grad_(), unit(N, D, gen).requires_grad_()
    s, w = torch.tensor(20.0, dtype=torch.float64, requires_grad=True), torch.rand(N, generator=gen) + 0.5
    full = alip.contrastive_loss(x, t, s, w.double())
    gx, gt, gs = torch.autograd.grad(full, (x, t, s))
    n = N // ranks
    local = sum(alip.contrastive_loss(x[r * n:(r + 1) * n], t[r * n:(r + 1) * n], s, w[r * n:(r + 1) * n].double(),
                                      x_all=x, t_all=t) for r in range(ranks)) / ranks
    lx, lt, ls = torch.autograd.grad(local, (x, t, s))
    for a, b in ((full, local), (gx, lx), (gt, lt), (gs, ls)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gathered", [False, True])
def test_contrastive_loss_equals_the_kernel_files_reference(gathered):
    """Two readable references of the same loss on purpose (the kernel file keeps its own): equal in float64."""
    gen = torch.Generator().manual_seed(10)
    N, n, offset, D = 24, 8, 8, 16
    x_all, t_all = unit(N, D, gen).requires_grad_(), unit(N, D, gen).requires_grad_()
    s = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n if gathered else N, generator=gen, dtype=torch.float64) + 0.5
    for weight in (None, w):
        if gathered:  # this rank's rows of the gathered features, as on one of several ranks
            x, t, kw = x_all[offset:offset + n], t_all[offset:offset + n], dict(x_all=x_all, t_all=t_all)
        else:
            x, t, kw = x_all, t_all, {}
        losses = (alip.contrastive_loss(x, t, s, weight, **kw),
                  kernels.gated_clip_loss_reference(x, t, s, weight, **kw, offset=offset if gathered else 0))
        got = [(loss, *torch.autograd.grad(loss, (x_all, t_all, s))) for loss in losses]
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: report(a, b))


@pytest.mark.parametrize("mode", ["all", "lcg", "dcg", "none"])
def test_alip_loss_is_two_weighted_paths(mode):
    """Eq. 6 on the hand-worked batch: its features at other lengths (alip_loss normalizes them), the weights of the
    table above, each path's loss by float64 loops."""
    x, t, c = gate_features()
    lengths = torch.tensor([[0.5], [3.0], [1.7]], dtype=torch.float64)
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    loss, logs, weights = alip.alip_loss(x * lengths, t * lengths.flip(0), c * 2.5, s,
                                         alip.Objective(alip.Gates(mode=mode)))
    _, w_s, w_t, w_c = (torch.tensor(w, dtype=torch.float64) for w in GATE_STEPS[1.0][0])
    ones = torch.ones(3, dtype=torch.float64)
    w_s = w_s if mode in ("all", "lcg") else ones
    w_t, w_c = (w_t, w_c) if mode in ("all", "dcg") else (ones, ones)
    raw, cap = loss_float64(x, t, s.item(), w_s * w_t, x, t, 0), loss_float64(x, c, s.item(), w_s * w_c, x, c, 0)
    for got, want in ((logs["loss_raw"], raw), (logs["loss_caption"], cap), (loss, raw + cap)):  # the weights
        assert abs(got.item() - want.item()) < 1e-9 * abs(want.item()), (got.item(), want.item())  # have 10 digits
    torch.testing.assert_close(weights[0], w_s, rtol=1e-9, atol=0)


def test_the_unweighted_losses_are_eq5_with_every_weight_1():
    """What each log line reports beside the gate-weighted loss: on the hand-worked batch, each path's float64 loss
    with all weights 1; the gates' running means are left as they were."""
    x, t, c = gate_features()
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    gates = alip.Gates()
    weights = gates(x, t, c)
    H = [h.clone() for h in gates.buffers()]
    run = SimpleNamespace(objective=alip.Objective(gates))
    got = alip.unweighted_losses(run, SimpleNamespace(feats=(x, t, c), scale=s, weights=weights))
    ones = torch.ones(3, dtype=torch.float64)
    for key, k in (("loss_raw_unweighted", t), ("loss_caption_unweighted", c)):
        want = loss_float64(x, k, s.item(), ones, x, k, 0)
        assert abs(got[key].item() - want.item()) < 1e-12 * abs(want.item()), (key, got[key].item(), want.item())
    assert all(torch.equal(a, b) for a, b in zip(gates.buffers(), H))
    assert alip.unweighted_losses(run, SimpleNamespace(feats=(x, t, None), scale=s, weights=None)) == {}


def step_on(model, micro):
    """train_step on a run of model alone (float64, CPU, SGD at lr 1, no clipping): (the Step, the gradient as the
    update -lr * grad moved the parameters, the gates' running means after)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    run = SimpleNamespace(model=model, raw_model=model, objective=alip.Objective(alip.Gates()), optimizer=optimizer,
                          scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), amp_dtype=None,
                          world_size=1, args=SimpleNamespace(grad_clip=0))
    before = [p.detach().clone() for p in model.parameters()]
    out = alip.train_step(run, micro)
    return out, [b - p.detach() for b, p in zip(before, model.parameters())], list(run.objective.gates.buffers())


def test_gradient_accumulation_equals_one_big_batch():
    """K micro-batches with cached features take the step of one batch of their union."""
    torch.manual_seed(7)
    model = alip.create_model("tiny").double()  # other batch shapes sum in other orders: compare in float64
    S = model.config.image_size
    images = torch.randn(8, 3, S, S, dtype=torch.float64)
    text, caption = random_tokens([3, 5, 2, 7, 4, 6, 1, 9]), random_tokens([4, 4, 4, 4, 2, 2, 2, 2])
    start = copy.deepcopy(model.state_dict())
    big, big_grads, big_H = step_on(model, [(images, text, caption)])
    model.load_state_dict(start)
    accum, grads, H = step_on(model, [(images[i:i + 4], text[i:i + 4], caption[i:i + 4]) for i in (0, 4)])
    assert abs(accum.loss.item() - big.loss.item()) < 1e-12 * abs(big.loss.item())
    torch.testing.assert_close(H, big_H, rtol=1e-12, atol=0)
    for a, b in zip(big_grads, grads):
        # against the tensor's largest entry: entries that are ~0 by cancellation have no relative precision
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * a.abs().max().item(), msg=lambda m: report(a, b))


def test_logit_scale_keeps_its_gradient_at_the_cap():
    """OpenAI's weights start at ln(100): the clamp must not cut the temperature's gradient there."""
    gen = torch.Generator().manual_seed(8)
    model = alip.create_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    x, t, c = (torch.randn(6, 128, generator=gen) for _ in range(3))
    loss, _, _ = alip.alip_loss(x, t, c, alip.capped_scale(model.logit_scale), alip.Objective(alip.Gates()))
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0


@pytest.mark.parametrize("precision, kernel, seen", [("bf16", "auto", torch.bfloat16),
                                                     ("bf16", "reference", torch.float32), ("fp32", "auto", torch.float32)])
def test_the_loss_gets_the_features_in_the_training_precision(precision, kernel, seen):
    """Under bf16 autocast the kernels' loss is handed bf16 features (it sums in fp32); the readable reference, and
    fp32 training, keep fp32. The gates see fp32 whatever the precision."""
    args = alip.parse_args(["--bench", "--model", "tiny", "--batch-size", "4", "--device", "cpu", "--precision",
                            precision, "--kernel", kernel])
    run = alip.Run(args)
    dtypes, loss_fn = [], run.objective.loss_fn

    def spy(x, t, *rest, **kw):
        dtypes.append((x.dtype, t.dtype))
        return loss_fn(x, t, *rest, **kw)

    gates = run.objective.gates
    gate_dtypes = []
    gates.register_forward_hook(lambda module, inputs, out: gate_dtypes.append({i.dtype for i in inputs}))
    run.objective.loss_fn = spy
    S, L = run.raw_model.config.image_size, run.raw_model.config.context_length
    micro = [[torch.randn(4, 3, S, S), torch.randint(1, 49406, (4, L)), torch.randint(1, 49406, (4, L))]]
    for b in micro[0][1:]:
        b[:, 10] = 49407  # EOT
    assert alip.train_step(run, micro) is not None
    assert dtypes == [(seen, seen)] * 2, dtypes  # the raw-text and the caption path
    assert gate_dtypes == [{torch.float32}], gate_dtypes
