"""
alip.py: stage two of ALIP: Adaptive Language-Image Pre-training with Synthetic Caption (Yang et al., ICCV 2023), the
method and the run, in one file. Stage one, the synthetic captions, is caption.py.

A CLIP model (ViT image tower, causal text tower) trained on image / raw-text / synthetic-caption triples.
The text tower encodes both texts ("bi-path"); two gates computed from the global batch down-weight noisy
samples (Language Consistency Gate) and noisy image-text pairs (Description Consistency Gate).

    python alip.py --demo                                      # CPU, ~2 minutes: toy data, CLIP vs ALIP
    python alip.py --data shards/ --captions caps.jsonl --model ViT-B-32      # one GPU (or CPU)
    torchrun --standalone --nproc_per_node=8 alip.py --data 'shards/{00000..01999}.tar' --captions caps.jsonl
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 alip.py --data ...
    python alip.py --bench --model ViT-B-32 --batch-size 512   # throughput on synthetic batches

Read top to bottom, the method comes first, in the paper's order: config -> model -> gates (Eq. 1-4) -> loss
(Eq. 5-6) -> optimizer and schedule -> the training step -> the loop. The plumbing follows: setup (the loss
implementation, the Run) -> checkpoints -> weight files -> flags -> demo -> benchmark -> entry point. Imports point
one way: data.py and kernels/ know nothing of this file, eval.py's functions take any model.
"""
import argparse
import functools
import glob
import itertools
import json
import math
import os
import random
import sys
import warnings
from collections import OrderedDict
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import data
import eval as evaluation
import kernels

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = False  # OpenAI's weights were trained with x*sigmoid(1.702x); ALIP used GELU


PRESETS = {  # named as open_clip names them; `tiny` is ours, for the demo: 60 steps take a CPU minute
    "tiny": ModelConfig(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                        vision_heads=2, text_width=64, text_layers=2, text_heads=2),
    "ViT-B-32": ModelConfig(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                            vision_heads=12, text_width=512, text_layers=12, text_heads=8),
    "ViT-B-16": ModelConfig(embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                            vision_heads=12, text_width=512, text_layers=12, text_heads=8),
    "ViT-L-14": ModelConfig(embed_dim=768, image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                            vision_heads=16, text_width=768, text_layers=12, text_heads=12),
}

# -----------------------------------------------------------------------------
# model: parameter names and shapes follow OpenAI CLIP, so its checkpoints (and open_clip's, and the
# authors' ALIP release) load with strict=True.


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, W/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, quick_gelu):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width),
            gelu=QuickGELU() if quick_gelu else nn.GELU(),
            c_proj=nn.Linear(4 * width, width),
        ))

    def forward(self, x, causal):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x, causal=False):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, cfg.quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images):  # (B, 3, S, S)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, grid*grid, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + grid*grid, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # class token -> (B, embed_dim)


class CLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.trim_text = True
        self._init_text_tower()

    def _init_text_tower(self):  # as OpenAI CLIP: residual projections scaled down by depth
        cfg = self.config
        w, layers = cfg.text_width, cfg.text_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=w ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=w ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, tokens):  # (B, context_length) int64
        eot = tokens.argmax(dim=-1)  # EOT (49407) is the largest id in the vocabulary
        if self.trim_text:
            # The causal mask keeps every position from seeing later ones, so the padding after the
            # longest EOT cannot change any EOT feature: drop it and save the compute.
            tokens = tokens[:, :int(eot.max()) + 1]
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # (B, L, W)
        x = self.ln_final(self.transformer(x, causal=True))
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (B, embed_dim)

    def forward(self, images, texts):
        """One image pass and one text pass; ALIP stacks raw texts and captions into `texts`."""
        return self.encode_image(images), self.encode_text(texts)


def create_model(name, quick_gelu=False):
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}")
    return CLIP(replace(PRESETS[name], quick_gelu=quick_gelu))


# -----------------------------------------------------------------------------
# gates (paper Sec. 3.2, Eq. 1-4): weights from the agreement of raw text, caption and image


class Gates(nn.Module):
    """Running means H of three similarities, and the detached sample and pair weights they give.

    Takes L2-normalized features of the *global* batch, so every rank computes the same weights. `mode` is the
    paper's Table 4 ablation: "all" gates, only the sample weight ("lcg"), only the pair weights ("dcg"), "none".
    """

    MODES = ("all", "lcg", "dcg", "none")

    def __init__(self, momentum=0.99, gamma=2.0, init=1.0, mode="all"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"gates mode {mode!r}: choose one of {', '.join(self.MODES)}")
        self.momentum, self.gamma, self.mode = momentum, gamma, mode
        for name in ("H_tc", "H_xt", "H_xc"):  # buffers: checkpointed with the model state
            self.register_buffer(name, torch.tensor(init, dtype=torch.float64))

    @torch.no_grad()
    def forward(self, x, t, c):  # each (N, D)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 when the features are
        x, t, c = x.to(acc), t.to(acc), c.to(acc)
        s_tc, s_xt, s_xc = (t * c).sum(-1), (x * t).sum(-1), (x * c).sum(-1)  # (N,)
        m = self.momentum
        for H, s in ((self.H_tc, s_tc), (self.H_xt, s_xt), (self.H_xc, s_xc)):  # Eq. 1: H updated before use
            H.mul_(m).add_((1 - m) * s.double().mean())
        gate = lambda s, H: torch.exp(self.gamma * (s - H.to(acc)))
        w_s = gate(s_tc, self.H_tc).clamp(max=1.0)  # Eq. 2, LCG: raw text far from its caption -> small weight
        noisy = w_s < 1  # Eq. 3-4, DCG: only samples the LCG flags get pair weights; not clipped
        ones = torch.ones_like(w_s)
        w_t, w_c = torch.where(noisy, gate(s_xt, self.H_xt), ones), torch.where(noisy, gate(s_xc, self.H_xc), ones)
        if self.mode in ("none", "dcg"):  # "dcg" keeps the pair weights on the samples the LCG flags
            w_s = ones
        if self.mode in ("none", "lcg"):
            w_t, w_c = ones, ones
        return w_s, w_t, w_c  # (N,) each

# -----------------------------------------------------------------------------
# loss (Eq. 5-6): a symmetric InfoNCE whose per-sample terms carry the gate weights

LOG_MAX_SCALE = math.log(100)  # the paper caps the logit scale s = exp(learnable) at 100


def capped_scale(param):
    """s = exp(param), at most 100. The cap applies before exp: exp(ln 100) rounds above 100 in fp32, so a cap after
    it would cut the gradient of weights that start at the cap, as OpenAI's do."""
    return param.clamp(max=LOG_MAX_SCALE).exp()


def sample_losses(x, t, logit_scale, x_all=None, t_all=None):
    """(CE_i(x->t) + CE_i(t->x)) / 2 for each of this rank's n samples (n,), logits s x t^T. x, t: (n, D), unit norm.
    With x_all, t_all (N, D), every rank's rows (this rank's among them): the local loss of multi-GPU training.
    CE_i = LSE_j(logits_ij) - s x_i.t_i, the positive pair this rank's own: the gather's gradient brings the rest."""
    x_all = x if x_all is None else x_all
    t_all = t if t_all is None else t_all
    positive = logit_scale * (x * t).sum(-1)  # (n,)
    ce_xt = torch.logsumexp(logit_scale * x @ t_all.T, dim=1) - positive  # (n,) image -> texts
    ce_tx = torch.logsumexp(logit_scale * t @ x_all.T, dim=1) - positive  # (n,) text -> images
    return (ce_xt + ce_tx) / 2


def contrastive_loss(x, t, logit_scale, weight=None, *, x_all=None, t_all=None):
    """Eq. 5: mean_i w_i (CE_i(x->t) + CE_i(t->x)) / 2, the readable reference. kernels' fused gated_clip_loss
    computes the same without materialising the n x N logits; the kernel file keeps a PyTorch reference of its own,
    as each kernel file does, and tests/test_alip.py pins the two equal."""
    per_sample = sample_losses(x, t, logit_scale, x_all, t_all)
    return (per_sample if weight is None else weight * per_sample).mean()


def gather_with_grad(x, world_size):
    """Concatenate every rank's rows; gradients flow back to the rank that owns them."""
    if world_size == 1:
        return x
    # Deprecated in torch 2.13 in favour of private functional collectives that are still being renamed;
    # this public one works from torch 2.0 on, NCCL and gloo alike.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(x), dim=0)


@dataclass
class Objective:
    """What the loss needs besides the features: the gates, the paths, the implementation, and this rank's rows."""
    gates: Gates
    bipath: bool = True  # ALIP; False: the CLIP baseline, the raw-text path alone, without gates
    loss_fn: Callable = contrastive_loss  # or kernels' fused loss: the same value and gradients
    loss_dtype: torch.dtype = None  # the features' dtype for loss_fn; None: the gates' (fp32, or float64)
    rank: int = 0
    world_size: int = 1


class LossOut(NamedTuple):
    loss: torch.Tensor  # this rank's share of Eq. 6
    logs: dict  # what a log line reports, detached
    weights: tuple  # (w_s, w_t, w_c) of the global batch, (N,) each; None for the CLIP baseline


def alip_loss(x, t, c, s, objective, weights=None):
    """The training objective on this rank's image, raw-text and caption features with logit scale s. Gradient
    accumulation hands every micro-step the gate `weights` of the step's first, and all but one a detached s: each
    micro-step's loss covers the whole step's batch, so s must get its gradient once."""
    o = objective
    acc = torch.promote_types(x.dtype, torch.float32)  # gates in fp32 (float64 stays float64)
    x, t = F.normalize(x.to(acc), dim=-1), F.normalize(t.to(acc), dim=-1)
    x_all, t_all = gather_with_grad(x, o.world_size), gather_with_grad(t, o.world_size)
    n, offset = x.shape[0], o.rank * x.shape[0]

    cast = (lambda f: f) if o.loss_dtype is None else (lambda f: f.to(o.loss_dtype))  # the gates keep `acc`
    x_loss, x_all_loss = cast(x), cast(x_all)

    def path(k, k_all, w):  # Eq. 5 for the pairs (x_i, k_i), the features in the loss's dtype
        gathered = {} if o.world_size == 1 else dict(x_all=x_all_loss, t_all=cast(k_all))
        return o.loss_fn(x_loss, cast(k), s, w, **gathered)

    if not o.bipath:
        loss = path(t, t_all, None)
        return LossOut(loss, {"loss_raw": loss.detach()}, None)
    c = F.normalize(c.to(acc), dim=-1)
    c_all = gather_with_grad(c, o.world_size)
    if weights is None:
        weights = o.gates(x_all, t_all, c_all)  # Eq. 1-4 on the global batch: the same weights on every rank
    w_s, w_t, w_c = (w[offset:offset + n] for w in weights)  # this rank's rows
    loss_raw = path(t, t_all, w_s * w_t)  # Eq. 5, image-raw text
    loss_cap = path(c, c_all, w_s * w_c)  # Eq. 5, image-caption
    logs = {"loss_raw": loss_raw.detach(), "loss_caption": loss_cap.detach(), "w_s": w_s.mean(), "w_t": w_t.mean(),
            "w_c": w_c.mean(), "H_tc": o.gates.H_tc, "H_xt": o.gates.H_xt, "H_xc": o.gates.H_xc}
    return LossOut(loss_raw + loss_cap, logs, weights)  # Eq. 6: the two paths summed


# -----------------------------------------------------------------------------
# optimizer and schedule


def configure_optimizer(model, lr, weight_decay, device):
    """AdamW; no decay on biases, norms, logit_scale and the class / positional embeddings.

    The authors' code decays every parameter; we follow CLIP / open_clip here (see README).
    """
    named = list(model.named_parameters())
    exempt = {name for name, p in named if p.ndim < 2 or name.endswith(("positional_embedding", "class_embedding"))}
    groups = [{"params": [p for name, p in named if name not in exempt], "weight_decay": weight_decay},
              {"params": [p for name, p in named if name in exempt], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def cosine_schedule(optimizer, warmup, total):
    """Linear warmup to the base lr, then cosine decay to zero."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -----------------------------------------------------------------------------
# the training step: embed, gates, loss, backward, update


@dataclass
class Step:
    """One optimizer step: this rank's loss and logs, its gradient norm, lr and logit scale, features, gate weights."""
    loss: torch.Tensor
    logs: dict
    grad_norm: torch.Tensor
    lr: float
    scale: torch.Tensor
    feats: list
    weights: tuple
    stop: bool  # every rank stops after this step (a signal reached one)


def embed(run, images, text, caption):
    """One image pass; one text pass over raw texts and captions stacked (raw texts only for CLIP)."""
    bipath = run.objective.bipath
    with evaluation.autocast(run.device, run.amp_dtype):
        x, tc = run.model(images, torch.cat([text, caption]) if bipath else text)
    return (x, *tc.chunk(2)) if bipath else (x, tc, None)


def forward_backward(run, micro):
    """Loss and gradients of one step over its micro-batches: (the last micro-step's LossOut, its features). The loss
    couples the step's samples: all micro-batches are embedded without grad, then each again with grad among the
    others' cached features (as open_clip's --accum-freq does), and the gradients add up to the whole batch's."""
    K, weights, cache = len(micro), None, None
    if K > 1:
        with torch.no_grad():
            cache = [embed(run, *b[:3]) for b in micro]
    for j, b in enumerate(micro):
        with nullcontext() if j == K - 1 or run.world_size == 1 else run.model.no_sync():
            feats = embed(run, *b[:3])
            if cache is not None:  # this micro-batch with grad, the others from the cache
                feats = [None if f is None else torch.cat([c[i] if k != j else f for k, c in enumerate(cache)])
                         for i, f in enumerate(feats)]
            s = capped_scale(run.raw_model.logit_scale)
            out = alip_loss(*feats, s if j == K - 1 else s.detach(), run.objective, weights)
            weights = out.weights
            run.scaler.scale(out.loss).backward()
    return out, feats


def train_step(run, micro, stop_requested=False):
    """One optimizer step on the micro-batches `micro`: a Step, or None if a non-finite loss or gradient on any rank
    skipped it, leaving every state as it was. A stop requested on any rank ends the run after this step."""
    gates, optimizer, scaler = run.objective.gates, run.optimizer, run.scaler
    H_before = [h.clone() for h in gates.buffers()]
    out, feats = forward_backward(run, micro)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.args.grad_clip or float("inf"))
    # A non-finite loss would also poison the gates' running means. Non-finite gradients under fp16 are the
    # gradient scaler's business: it skips the step and lowers its scale.
    finite = torch.isfinite(out.loss.detach()) & (torch.isfinite(grad_norm) | (run.amp_dtype == torch.float16))
    flags = torch.tensor([float(not finite), float(stop_requested)], device=run.device)
    if run.world_size > 1:  # every rank must agree to skip or to stop
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] > 0:
        for h, h0 in zip(gates.buffers(), H_before):  # the running means must not absorb a NaN
            h.copy_(h0)
        optimizer.zero_grad(set_to_none=True)
        return None  # a stop waits for the next good step, which saves
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    scale = capped_scale(run.raw_model.logit_scale.detach())  # and the scale
    scaler.step(optimizer)  # fp16: the scaler itself skips steps with inf gradients
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    with torch.no_grad():  # keep the learnable temperature within the paper's cap
        run.raw_model.logit_scale.clamp_(0, LOG_MAX_SCALE)
    return Step(out.loss.detach(), out.logs, grad_norm, lr, scale, feats, out.weights, bool(flags[1] > 0))


@torch.no_grad()
def unweighted_losses(run, out):
    """Eq. 5 of each path with every gate weight 1, on the step's features and scale: the contrastive loss as CLIP
    counts it. The logged loss is the gate-weighted one, which can rise while the model improves, as the gates move
    weight onto other samples; these cannot. {} for the CLIP baseline, whose loss is unweighted already."""
    if out.weights is None:
        return {}
    ones = torch.ones_like(out.weights[0])
    logs = alip_loss(*out.feats, out.scale, run.objective, (ones, ones, ones)).logs
    return {"loss_raw_unweighted": logs["loss_raw"], "loss_caption_unweighted": logs["loss_caption"]}


def train_loop(run, step, stop, batches):
    """Optimizer steps from `step` until run.total or a stop signal; returns the last step done."""
    args, meter, bad_steps = run.args, evaluation.GateMeter(sample_losses, run.rank, run.world_size), 0
    lines = evaluation.TrainLog(step, run.total, args.accum_steps * args.batch_size * run.world_size, run.world_size)
    run.model.train()
    while step < run.total:
        micro = [next(batches) for _ in range(args.accum_steps)]
        out = train_step(run, micro, stop["signal"] is not None)
        if out is None:
            bad_steps += 1
            run.log(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_steps} in a row)",
                    {"step": step + 1, "warning": "non-finite loss, step skipped"})
            if bad_steps >= args.max_bad_steps:
                raise SystemExit(f"{bad_steps} non-finite steps in a row: stopping. The last good checkpoint in "
                                 f"{args.output} is intact; lower --lr or check the data, then --resume.")
            continue
        bad_steps, step = 0, step + 1
        codes = torch.cat([b[3] for b in micro])  # what the data record about each sample's texts; -1: nothing
        if (codes >= 0).any():
            meter.add(codes, out.feats, out.scale, out.weights)
        if step % args.log_every == 0 or step == run.total:
            logs = {"loss": out.loss, **out.logs, **unweighted_losses(run, out)}
            record, line = lines.line(step, logs, run.loader.skipped, meter.figures(),
                                         lr=out.lr, logit_scale=capped_scale(run.raw_model.logit_scale).item(),
                                         grad_norm=out.grad_norm.item())
            run.log(line, record)
        if step % args.save_every == 0 or step == run.total or out.stop:
            save(run, step)
        if out.stop:
            run.log(f"stopped by signal {int(stop['signal'] or 0)} at step {step}; continue with --resume")
            break
        if run.master and args.eval_every and step % args.eval_every == 0 and step < run.total:
            evaluate(run, step)
    return step


# -----------------------------------------------------------------------------
# setup: the loss implementation; a Run built from the flags (device, precision and DDP through data.py's
# choose_compute and init_distributed, which stage one shares)


def select_loss(args, device, amp_dtype, world_size):
    """--kernel -> (loss function, the dtype of the features it gets, what to log). "reference": contrastive_loss on
    fp32 features. "fused", "auto": kernels' gated_clip_loss on features in the training precision, summed in fp32 by
    its kernels or, where "auto" picks it per shape (choose_impl, logged), its reference (which widens them first)."""
    if args.kernel == "reference":
        return contrastive_loss, None, "reference (PyTorch, fp32)"
    if args.kernel == "fused" and not kernels.fused_available(device):
        raise data.UserError("--kernel fused needs a CUDA device, or TRITON_INTERPRET=1 to run Triton on the CPU")
    n = args.batch_size * args.accum_steps  # the rows of one loss call on this rank, against all ranks' rows
    name, why = kernels.gated_clip_loss.choose_impl(n, n * world_size, PRESETS[args.model].embed_dim,
                                                    amp_dtype or torch.float32, device, args.kernel)
    return functools.partial(kernels.gated_clip_loss.gated_clip_loss, impl=args.kernel), amp_dtype, f"{name}: {why}"


class Run:
    """What every step uses, built from the flags: device, model, objective, data, optimizer and schedule."""

    def __init__(self, args):
        self.args = args
        compute = data.choose_compute(args.device, args.precision)
        self.device = device = compute.device
        # The other ranks wait in a collective while rank 0 evaluates: allow for a large evaluation set.
        self.rank, self.world_size = rank, world_size = data.init_distributed(
            "nccl" if device.type == "cuda" else "gloo", timedelta(hours=1))
        if device.type == "cuda":  # fp32 matmuls (the gates and the loss on fp32 features) on tensor cores: tf32
            torch.set_float32_matmul_precision("high")
        torch.manual_seed(args.seed)  # same initial weights on every rank; data randomness is seeded separately
        more = {"bf16": ", fp32 gates and loss (tf32 matmuls)", "fp16": ", a gradient scaler", "fp32": ""}
        self.amp_dtype, self.precision = compute.amp, compute.reason + more[compute.precision]
        self.log(f"device {device} x {world_size}, precision: {self.precision}")
        self.metrics, self.lock = None, claim_output(args) if self.master and not args.bench else None
        if args.demo and not args.data:
            self.use_demo_data()
        self.raw_model = create_model(args.model, args.quick_gelu)  # saved and evaluated, also when compiled
        if args.init:
            init_weights(self.raw_model, args.init, args.quick_gelu)
            self.log(f"initialised from {args.init}")
        self.raw_model.to(device).set_grad_checkpointing(args.grad_checkpointing)
        self.model = torch.compile(self.raw_model) if args.compile else self.raw_model  # what the step calls
        if world_size > 1:
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        loss_fn, loss_dtype, self.loss_reason = select_loss(args, device, self.amp_dtype, world_size)
        self.objective = Objective(Gates(args.momentum, args.gamma, mode=args.gates).to(device), args.loss == "alip",
                                   loss_fn, loss_dtype, rank, world_size)
        self.log(f"model {args.model}: {sum(p.numel() for p in self.raw_model.parameters()) / 1e6:.1f}M parameters; "
                 f"loss {args.loss} (gates: {args.gates}), kernel {self.loss_reason}")
        self.loader, self.total = None, BENCH_WARMUP + args.bench_steps  # --bench: synthetic batches, no data
        if not args.bench:
            self.loader = data.TrainLoader(
                args.data, image_size=self.raw_model.config.image_size, batch_size=args.batch_size, seed=args.seed,
                rank=rank, world_size=world_size, workers=args.workers, captions=args.captions,
                missing_caption=args.missing_caption, resampled=args.resampled, num_samples=args.train_num_samples,
                max_bad_fraction=args.max_bad_fraction, text_ext=args.text_ext, caption_ext=args.caption_ext,
                truth=True)  # what the data record about their texts, if anything: gate quality is logged against it
            self.log(self.loader.caption_report())
            steps_per_epoch = self.loader.steps_per_epoch // args.accum_steps
            if steps_per_epoch < 1:
                raise data.UserError(f"--data {args.data}: one step needs {args.batch_size * world_size} x "
                                     f"{args.accum_steps} samples but an epoch has fewer; lower --batch-size or "
                                     "--accum-steps")
            self.total = args.steps or math.ceil(args.epochs * steps_per_epoch)  # optimizer steps
        self.optimizer = configure_optimizer(self.raw_model, args.lr, args.wd, device)
        self.scheduler = cosine_schedule(self.optimizer, args.warmup, self.total)
        if args.warmup >= self.total and not args.bench:
            self.log(f"warning: --warmup {args.warmup} is not shorter than the run ({self.total} steps): the learning "
                     f"rate peaks at {self.total / args.warmup:.0%} of --lr {args.lr}")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def master(self):  # prints, writes metrics and checkpoints, evaluates
        return self.rank == 0

    def log(self, message, record=None):
        """Rank 0: print the message, and add the record to the run's metrics (metrics.jsonl and the reporters)."""
        if self.master:
            print(message)
            if record:
                self.metrics.log(record)

    def use_demo_data(self):
        """--demo without --data: rank 0 writes the demo set next to --output; train and evaluate on it."""
        args, root = self.args, os.path.join(os.path.dirname(os.path.abspath(self.args.output)), "demo_data")
        if self.master:
            data.write_demo(root)
        if self.world_size > 1:  # the other ranks reuse what rank 0 wrote
            dist.barrier()
        paths = data.write_demo(root)
        args.data = paths["train"]
        args.eval_zeroshot = args.eval_zeroshot or paths["test"]
        args.eval_retrieval = args.eval_retrieval or paths["test"]


def train(args):
    """One training run as the flags say; True when it reached its last step (False: stopped by a signal)."""
    run, curves, failed = Run(args), None, True
    try:
        step = resume(run)
        # However the loop ends, even by an exception, the loader's workers stop and the signal handlers go back.
        with data.on_signals() as stop, closing(run.loader.batches(run.device)) as batches:
            step = train_loop(run, step, stop, batches)
        if run.master:  # a resumed run that had finished evaluates again only what is missing
            if step == run.total and not run.metrics.evaluated(step, args.eval_zeroshot, args.eval_retrieval):
                evaluate(run, step)
            curves = evaluation.plot_runs([args.output], os.path.join(args.output, "curves.png"))
            run.log(f"curves: {curves}")
        failed = False
    finally:  # the reporters end, sent the curves; --output's lock goes
        if run.metrics:
            run.metrics.close(curves, failed)
        if run.lock:
            run.lock.close()
    if run.world_size > 1:
        dist.barrier()
        if not args.demo:  # demo() trains again in the same process group, and ends it
            dist.destroy_process_group()
    return step == run.total  # False: stopped early (by a signal)


def evaluate(run, step):
    """Rank 0: zero-shot and retrieval on the --eval-* sets, in the training precision."""
    args = run.args
    results = {"step": step, **evaluation.evaluate_sets(run.raw_model, args.eval_zeroshot, args.eval_retrieval,
                                                         device=run.device, workers=args.workers, dtype=run.amp_dtype)}
    run.log("eval " + evaluation.summary(results), results)


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue bit for bit, written atomically


def checkpoints(out_dir):
    """out_dir's checkpoints, oldest first (the step in the name is zero-padded)."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt-*.pt")))


def latest_checkpoint(out_dir):
    return (checkpoints(out_dir) or [None])[-1]


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def claim_output(args):
    """Rank 0, before anything is built: hold --output's lock (one run per folder at a time; this is also the first
    write there, and clears the temp files of a save that a kill cut short), and refuse a fresh run over another run's
    checkpoints (pruning would delete them, and the new run's first checkpoint, which sorts before them)."""
    lock = data.lock_directory(args.output, "--output")
    if not args.resume and latest_checkpoint(args.output):
        lock.close()
        newest = os.path.basename(latest_checkpoint(args.output))
        raise data.UserError(f"--output {args.output} holds an earlier run's checkpoints (the newest: {newest}); pass "
                             "--resume to continue it, or another --output")
    return lock


CHECKPOINT_KEYS = {"model", "config", "optimizer", "scheduler", "scaler", "gates", "data", "rng", "step"}


def newest_resumable(out_dir, config):
    """(path, checkpoint, passed): the newest checkpoint in out_dir that loads and has this architecture (config, a
    dict) or None, and the newer ones passed over as [(path, why, their config if it is another)]."""
    passed = []
    for path in reversed(checkpoints(out_dir)):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated, zeroed or overwritten file fails in many ways (zip, pickle, EOF)
            passed.append((path, f"unreadable, {type(e).__name__}", None))
            continue
        if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and ckpt["config"] != config:
            other = ModelConfig(**ckpt["config"])
            passed.append((path, f"another architecture, {describe_config(other)}", other))
        elif not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
            passed.append((path, "not a complete training checkpoint", None))
        else:
            return path, ckpt, passed
    return None, None, passed


def move_aside(path):
    """Rename PATH to PATH.bad (or .bad.1, ...): kept for a look, never deleted, and out of the ckpt-*.pt that
    resuming and pruning read."""
    names = (f"{path}.bad" + (f".{n}" if n else "") for n in itertools.count())
    aside = next(name for name in names if not os.path.exists(name))
    os.replace(path, aside)
    return aside


def resume(run):
    """The step to start from: 0, or with --resume that of the newest checkpoint in --output that loads, all
    state restored. Newer checkpoints that do not load, or are of another architecture, are moved aside."""
    args = run.args
    path, ckpt, passed = None, None, []
    if args.resume:
        path, ckpt, passed = newest_resumable(args.output, asdict(run.raw_model.config))
    if run.world_size > 1:
        seen = [None] * run.world_size
        dist.all_gather_object(seen, path and os.path.basename(path))
        if len(set(seen)) > 1:
            raise data.UserError(f"--resume: ranks see different checkpoints in {args.output} "
                                 f"({sorted(set(map(str, seen)))}); --output must be on a filesystem every node shares")
    if path is None and passed:  # nothing to resume from, and starting afresh would prune the files there
        newest, why, found = passed[0]
        if all(other is not None for _, _, other in passed):  # the flags, not the files, are wrong
            cfg = run.raw_model.config
            raise data.UserError(f"--resume: the checkpoints in {args.output} are of {describe_config(found)}, this "
                                 f"run is of {describe_config(cfg)}; {flags_for(found, cfg)}, or another --output")
        raise data.UserError(f"--resume: no checkpoint in {args.output} can be resumed from (the newest, {newest}: "
                             f"{why}); move them out of the way to start afresh, or pass another --output")
    if passed and run.master:
        moved = "; ".join(f"{os.path.basename(p)} ({why}) to {os.path.basename(move_aside(p))}" for p, why, _ in passed)
        print(f"--resume: moved aside the newer checkpoints in {args.output} that cannot be resumed from: {moved}",
              file=sys.stderr)
    if args.resume and path is None:
        run.log(f"--resume: no checkpoint in {args.output} yet, starting from scratch")
    step, run.segments = 0, [{"from_step": 0, "args": dict(vars(args))}]
    if path:
        changed = resume_changes(args, ckpt, run.world_size, os.path.basename(path))
        for part, key in ((run.raw_model, "model"), (run.optimizer, "optimizer"), (run.scheduler, "scheduler"),
                          (run.scaler, "scaler"), (run.objective.gates, "gates"), (run.loader, "data")):
            part.load_state_dict(ckpt[key])
        set_rng_state(ckpt["rng"][run.rank])
        step = ckpt["step"]
        run.segments = ckpt.get("segments") or [{"from_step": 0, "args": ckpt.get("args", {})}]
        run.log(f"resumed from {path} at step {step}")
        if "lr" in changed:
            set_base_lr(run, args.lr)  # the optimizer and schedule restored the checkpoint's
        if changed:
            run.segments = [*run.segments, {"from_step": step, "args": dict(vars(args))}]
            run.log(f"--resume: from step {step}: " + ", ".join(f"--{k.replace('_', '-')} {now} (was {was})"
                                                              for k, (was, now) in changed.items()))
    if run.master:
        name = args.wandb_name or os.path.basename(os.path.abspath(args.output))
        options = dict(project=args.wandb_project or "alip", name=name, tags=args.wandb_tags, config=vars(args),
                       resume=args.resume)
        run.metrics = evaluation.RunLog(args.output, step, args.report_to, options)
        with data.atomic_write(os.path.join(args.output, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model": asdict(run.raw_model.config), "segments": run.segments}, f,
                      indent=1)
    return step


# What a resume may change: each is applied from the resumed step on, said in one line and recorded as a new segment
# of the run (config.json, the checkpoints). --lr sets the base rate; the schedule keeps its shape (warmup, cosine
# over the same steps). Any other training flag, and the number of processes, is fixed: changing it would change
# what the run is (data, model, objective, batch, schedule) or break its bit-exact continuation (the seed, the
# precision, the loader's worker count, which orders the data), so a resume that changes it is refused.
RESUME_MAY_CHANGE = {"lr", "grad_clip", "max_bad_steps", "max_bad_fraction", "kernel", "device", "compile",
                     "grad_checkpointing", "log_every", "save_every", "keep", "eval_every", "eval_zeroshot",
                     "eval_retrieval", "report_to", "wandb_project", "wandb_name", "wandb_tags", "debug"}
NOT_OF_THE_RUN = {"resume", "output", "demo", "seeds", "bench", "bench_steps", "bench_ablate", "peak_tflops"}


def resume_changes(args, ckpt, world_size, name):
    """{flag: (the checkpoint's value, this run's)} for the flags a resume changes, all of RESUME_MAY_CHANGE; a
    UserError naming the others, with the checkpoint's values. A checkpoint that predates a flag says nothing of it."""
    saved = ckpt.get("args") or {}
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if k in saved and k not in NOT_OF_THE_RUN and saved[k] != v}
    fixed = [f"--{k.replace('_', '-')} {now} (the checkpoint's: {was})" for k, (was, now) in changed.items()
             if k not in RESUME_MAY_CHANGE]
    if len(ckpt["rng"]) != world_size:
        fixed.append(f"{world_size} process(es) (the checkpoint's: {len(ckpt['rng'])})")
    if fixed:
        raise data.UserError(f"--resume: {'; '.join(fixed)} would make {name}'s run another one (or not continue it "
                             "exactly); resume it as it ran, or start a new run in another --output (--init from this "
                             "one)")
    return changed


def set_base_lr(run, lr):
    """The base learning rate from now on, at the schedule's current point (a resume's --lr)."""
    sched = run.scheduler
    sched.base_lrs = [lr] * len(run.optimizer.param_groups)
    for group, factor in zip(run.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in run.optimizer.param_groups]  # what get_last_lr() reports


def save(run, step):
    """Every rank takes part (the RNG states are gathered); rank 0 writes."""
    rngs = [rng_state()]
    if run.world_size > 1:
        rngs = [None] * run.world_size
        dist.all_gather_object(rngs, rng_state())
    weights = run.raw_model.state_dict()
    # "state_dict" holds the same dict again, where open_clip's load_checkpoint looks: pickle writes a dict it has
    # written before as a reference, so the tensors are in the file once.
    state = {"model": weights, "state_dict": weights, "config": asdict(run.raw_model.config), "args": vars(run.args),
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict(), "gates": run.objective.gates.state_dict(),
             "data": run.loader.state_dict(), "rng": rngs, "step": step, "segments": run.segments}
    if run.master:  # written atomically: a crash or a full disk leaves the previous checkpoint intact
        path = os.path.join(run.args.output, f"ckpt-{step:08d}.pt")
        with data.atomic_write(path) as f:
            torch.save(state, f)
        for old in checkpoints(run.args.output)[:-run.args.keep]:
            os.remove(old)
        run.log(f"saved {path}")


# -----------------------------------------------------------------------------
# weight files: ours, OpenAI's, open_clip's and the ALIP release's; the architecture read off the shapes


SHAPE_FIELDS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "text_width", "text_layers",
                "context_length", "vocab_size")  # what a state dict's shapes tell (heads and activation they don't)


def preset_of(cfg):
    """The name of the preset with cfg's parameter shapes, or None."""
    return next((n for n, p in PRESETS.items() if all(getattr(p, f) == getattr(cfg, f) for f in SHAPE_FIELDS)), None)


def describe_config(cfg):
    """'preset NAME' (with QuickGELU), or the shapes of a config that no preset has."""
    name = preset_of(cfg)
    if name is None:
        return "no preset (" + ", ".join(f"{f} {getattr(cfg, f)}" for f in SHAPE_FIELDS) + ")"
    return f"preset {name}" + (" with QuickGELU" if cfg.quick_gelu else "")


def flags_for(found, current):
    """What to pass to build `found` instead of `current`."""
    name = preset_of(found)
    if name is None:
        return f"no preset fits; --model is one of {', '.join(PRESETS)}"
    gelu = " --quick-gelu" if found.quick_gelu else " without --quick-gelu" if current.quick_gelu else ""
    return f"pass --model {name}{gelu}"


def check_weights(sd, model, path, found=None):
    """A UserError unless state dict sd fits model: its keys and shapes and, where the file saves one (`found`, our
    checkpoints), its architecture. A wrong one is named by its preset (read off the shapes where the file does not
    say) with the flags that build it, instead of load_state_dict's list of mismatches."""
    want, cfg = {k: v.shape for k, v in model.state_dict().items()}, model.config
    fits = set(sd) == set(want) and all(sd[k].shape == shape for k, shape in want.items())
    if fits and (found is None or describe_config(found) == describe_config(cfg)):
        return
    if found is None:
        try:
            found = shapes_config(sd)
        except (KeyError, IndexError, ValueError):  # not even the tensors the shapes are read from
            pass
    if found is None or not fits and all(getattr(found, f) == getattr(cfg, f) for f in SHAPE_FIELDS):
        missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        if not missing and not extra:
            k = next(k for k in want if sd[k].shape != want[k])
            raise data.UserError(f"{path}: {k} has shape {tuple(sd[k].shape)}, this model's {tuple(want[k])}")
        raise data.UserError(f"{path}: not a CLIP state dict in OpenAI's layout ({len(missing)} keys missing"
                             f"{', e.g. ' + missing[0] if missing else ''}; {len(extra)} unexpected"
                             f"{', e.g. ' + extra[0] if extra else ''})")
    raise data.UserError(f"{path}: weights of {describe_config(found)}, not of {describe_config(cfg)}; "
                         f"{flags_for(found, cfg)}")


def read_weights(path):
    """(file, state dict, config, openai) of a weight file or a run directory (its newest checkpoint): config is the
    architecture one of our checkpoints saves (a dict), else None; openai: the file is one of OpenAI's TorchScript
    archives, whose weights were trained with QuickGELU. A file that does not load is a one-line UserError."""
    if os.path.isdir(path):
        if latest_checkpoint(path) is None:
            raise data.UserError(f"{path}: no ckpt-*.pt in this run directory; pass a checkpoint file")
        path = latest_checkpoint(path)
    if not os.path.isfile(path):
        raise data.UserError(f"{path}: no such file")
    try:
        try:
            with warnings.catch_warnings():  # torch.load says it hands a TorchScript archive on; we do so below
                warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as e:
            if "TorchScript" not in str(e) and "constants.pkl" not in str(e):
                raise
            return path, clean_state_dict(torch.jit.load(path, map_location="cpu").state_dict()), None, True
    except Exception as error:  # a damaged or foreign file fails in many ways: zip, pickle, EOF, unicode
        reason = type(error).__name__
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if first and not first.startswith("Weights only load failed"):  # torch's advice there: trust the file
            reason += f": {first[:100]}"
        raise data.UserError(f"{path}: cannot load it: damaged, or not a PyTorch checkpoint ({reason})") from error
    if not isinstance(obj, dict):
        raise data.UserError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    if "model" in obj and "config" in obj:  # ours
        return path, obj["model"], obj["config"], False
    return path, clean_state_dict(obj), None, False


def clean_state_dict(sd):
    """Accept a bare state dict, {"state_dict": ...}, DDP's "module." prefixes and OpenAI's metadata keys."""
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def with_heads(cfg, head_width):
    """cfg with attention heads head_width wide; one head in a tower whose width head_width does not divide."""
    def heads(width):
        return width // head_width if width % head_width == 0 else 1
    return replace(cfg, vision_heads=heads(cfg.vision_width), text_heads=heads(cfg.text_width))


def describe_heads(cfg):
    return (f"{cfg.vision_heads} vision heads of {cfg.vision_width // cfg.vision_heads} and {cfg.text_heads} text "
            f"heads of {cfg.text_width // cfg.text_heads}")


def shapes_config(sd, quick_gelu=False, head_width=None):
    """The ModelConfig of a CLIP state dict, read off its shapes as OpenAI's build_model does. The shapes do not tell
    the heads: head_width wide where given; else the heads of the preset with these shapes; else 64 wide, as in every
    OpenAI CLIP. Nor do they tell the activation."""
    def layers(prefix):
        return len({k[len(prefix):].split(".")[2] for k in sd if k.startswith(prefix + ".resblocks.")})
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    cfg = ModelConfig(embed_dim=sd["text_projection"].shape[1], image_size=patch * grid, patch_size=patch,
                      vision_width=vision_width, vision_layers=layers("visual.transformer"), vision_heads=1,
                      text_width=sd["ln_final.weight"].shape[0], text_layers=layers("transformer"), text_heads=1,
                      context_length=sd["positional_embedding"].shape[0],
                      vocab_size=sd["token_embedding.weight"].shape[0], quick_gelu=quick_gelu)
    preset = PRESETS.get(preset_of(cfg))
    if head_width is None and preset is not None:
        return replace(cfg, vision_heads=preset.vision_heads, text_heads=preset.text_heads)
    return with_heads(cfg, head_width or 64)


def load_model(path, name=None, quick_gelu=False, head_width=None):
    """A CLIP in eval mode on the CPU from a run directory, one of our checkpoints, or a CLIP state dict (its
    architecture from `name`, a preset, or else read off the shapes, with heads head_width wide: shapes_config).
    A name, quick_gelu or head_width that contradicts the architecture a checkpoint saves is refused, not ignored."""
    path, sd, saved, openai = read_weights(path)
    if name is not None and name not in PRESETS:
        raise data.UserError(f"{path}: --model {name} is no preset; choose one of {', '.join(PRESETS)}")
    if head_width is not None and head_width < 1:
        raise data.UserError(f"{path}: --head-width {head_width}: must be at least 1")
    quick_gelu, guess = quick_gelu or openai, None
    if saved or name:
        cfg = ModelConfig(**saved) if saved else replace(PRESETS[name], quick_gelu=quick_gelu)
        said = [flag for flag, wrong in (
            (f"--model {name}", saved and name and replace(PRESETS[name], quick_gelu=cfg.quick_gelu) != cfg),
            ("--quick-gelu", quick_gelu and not cfg.quick_gelu),
            (f"--head-width {head_width}", head_width and with_heads(cfg, head_width) != cfg)) if wrong]
        if said:
            whose = "one of our checkpoints, which saves its architecture" if saved else f"--model {name}"
            raise data.UserError(f"{path}: {whose} ({describe_config(cfg)}, {describe_heads(cfg)}); {said[0]} "
                                 "says otherwise: drop it")
    else:
        cfg = shapes_config(sd, quick_gelu, head_width)
        if head_width is not None and (cfg.vision_width % head_width or cfg.text_width % head_width):
            raise data.UserError(f"{path}: --head-width {head_width} does not divide its widths (vision "
                                 f"{cfg.vision_width}, text {cfg.text_width})")
        if head_width is None:  # the shapes do not tell the heads, and other heads give other features
            preset = preset_of(cfg)
            guess = (f"{path}: a bare state dict, built with {describe_heads(cfg)} ("
                     + (f"those of preset {preset}" if preset else "64 wide as in OpenAI's CLIPs: no preset has "
                        "these shapes") + "); if it was trained with heads of another width, pass --head-width N")
    model = CLIP(cfg)
    check_weights(sd, model, path, cfg if saved else None)
    model.load_state_dict(sd)
    if guess:
        print(guess, file=sys.stderr)
    return model.eval()


def init_weights(model, path, quick_gelu):
    """--init: load path (a weight file or a run directory) into model, after checking that it fits."""
    try:
        path, sd, saved, openai = read_weights(path)
        if openai and not quick_gelu:
            raise data.UserError(f"{path}: OpenAI's weights were trained with QuickGELU; add --quick-gelu")
        check_weights(sd, model, path, saved and ModelConfig(**saved))
    except data.UserError as e:
        raise data.UserError(f"--init {e}") from e
    model.load_state_dict(sd)


# -----------------------------------------------------------------------------
# flags


def parse_args(argv=None):
    p = data.ArgumentParser(description="Train ALIP (or the CLIP baseline) on tar shards.")
    # data
    p.add_argument("--data", help="training shards: directory, glob or brace list; several joined with :: "
                                  "(default: none, for --demo or --bench)")
    p.add_argument("--captions", help="JSONL side file of synthetic captions {key, caption}, joined by key "
                                      "(default: the shards' own)")
    p.add_argument("--missing-caption", default="skip", choices=["skip", "raw"], help="sample without a caption")
    p.add_argument("--text-ext", default="txt", help="tar member holding the raw text: {key}.EXT")
    p.add_argument("--caption-ext", default="syn.txt", help="tar member holding the synthetic caption")
    p.add_argument("--train-num-samples", type=data.positive_int,
                   help="samples per epoch (default: read or count the shards)")
    p.add_argument("--resampled", action="store_true", help="draw shards with replacement (very large sets)")
    p.add_argument("--max-bad-fraction", type=data.fraction, default=0.5, help="stop when more samples than this fail")
    p.add_argument("--workers", type=data.nonnegative_int, default=4, help="data-loading processes per rank")
    p.add_argument("--demo", action="store_true",
                   help="make the toy data set, train the CLIP baseline and ALIP on it as `tiny`, compare them")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="--demo: one CLIP and one ALIP run per seed, mean ± sd (default: --seed alone)")
    # model
    p.add_argument("--model", default="ViT-B-32", choices=list(PRESETS), help="architecture (open_clip's names)")
    p.add_argument("--quick-gelu", action="store_true", help="QuickGELU, as OpenAI's weights need")
    p.add_argument("--init", help="initial weights: a run directory, a checkpoint, a CLIP/open_clip/ALIP state dict "
                                  "(default: random)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    # method
    p.add_argument("--loss", default="alip", choices=["alip", "clip"], help="alip: bi-path; clip: raw text only")
    p.add_argument("--gates", default="all", choices=Gates.MODES, help="Table 4 ablations")
    p.add_argument("--gamma", type=data.nonnegative_float, default=2.0, help="gate sharpness")
    p.add_argument("--momentum", type=data.fraction, default=0.99, help="running-mean momentum of the gates")
    p.add_argument("--kernel", default="auto", choices=["auto", "fused", "reference"], help="loss implementation")
    # optimization
    p.add_argument("--batch-size", type=data.positive_int, default=256, help="per rank, per micro-step")
    p.add_argument("--accum-steps", type=data.positive_int, default=1, help="micro-batches per step (features cached)")
    p.add_argument("--epochs", type=data.positive_float, default=32, help="passes over the data")
    p.add_argument("--steps", type=data.positive_int, help="total optimizer steps (default: from --epochs)")
    p.add_argument("--lr", type=data.positive_float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=data.nonnegative_int, default=2000, help="linear warmup steps")
    p.add_argument("--wd", type=data.nonnegative_float, default=0.2, help="weight decay (not on gains, biases, ...)")
    p.add_argument("--grad-clip", type=data.nonnegative_float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--max-bad-steps", type=data.positive_int, default=5, help="stop after N non-finite steps in a row")
    # system
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and augmentation")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too (or ALIP_DEBUG=1)")
    # output
    p.add_argument("--output", default="runs/alip", help="checkpoints and metrics.jsonl go here")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output that loads")
    p.add_argument("--save-every", type=data.positive_int, default=1000, help="checkpoint every N steps and at the end")
    p.add_argument("--keep", type=data.positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--log-every", type=data.positive_int, default=50, help="a log line every N steps")
    p.add_argument("--report-to", type=data.comma_list, default=[],
                   help="also send the metrics to tensorboard (OUTPUT/tensorboard), wandb, or both: tensorboard,wandb")
    p.add_argument("--wandb-project", help="W&B project (default: alip; WANDB_MODE=offline: a local run folder)")
    p.add_argument("--wandb-name", help="W&B run name (default: --output's folder name)")
    p.add_argument("--wandb-tags", type=data.comma_list, default=[], help="W&B tags, comma-separated")
    # evaluation
    p.add_argument("--eval-every", type=data.nonnegative_int, default=0, help="evaluate every N steps (0: at the end)")
    p.add_argument("--eval-zeroshot",
                   help="zero-shot classification set (see eval.py; default: none, --demo: its test set)")
    p.add_argument("--eval-retrieval", help="retrieval set (see eval.py; default: none, --demo: its test set)")
    # benchmark
    p.add_argument("--bench", action="store_true", help="time training steps on synthetic in-memory batches")
    p.add_argument("--bench-steps", type=data.positive_int, default=20, help="timed steps per variant")
    p.add_argument("--bench-ablate", action="store_true", help="also time without trimming / fused SDPA / fused loss")
    p.add_argument("--peak-tflops", type=data.positive_float,
                   help="accelerator peak for MFU (default: H100/H200 bf16 dense)")
    sniff = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")]  # --help shows these
    if p.parse_known_args(sniff)[0].demo:  # both runs in a CPU minute or two; flags still win
        p.set_defaults(model="tiny", batch_size=256, steps=60, warmup=6, lr=3e-3, workers=1, save_every=60,
                       log_every=10, eval_every=20, output="runs/demo")
    args = p.parse_args(argv)
    if not (args.data or args.demo or args.bench):
        p.error("--data is required (or --demo, or --bench)")
    if args.seeds and not args.demo:
        p.error("--seeds runs the demo once per seed: add --demo (a run of your own takes --seed)")
    unused = [flag for flag, value in (("--wandb-project", args.wandb_project), ("--wandb-name", args.wandb_name),
                                       ("--wandb-tags", args.wandb_tags)) if value and "wandb" not in args.report_to]
    if unused:
        p.error(f"{unused[0]} is for W&B: add --report-to wandb")
    evaluation.check_reporters(args.report_to)  # a missing package is found before anything is built
    for flag, dataset in (("--eval-zeroshot", args.eval_zeroshot), ("--eval-retrieval", args.eval_retrieval)):
        if dataset:  # found now, not once the training is over
            evaluation.check_dataset(dataset, flag)
    return args


# -----------------------------------------------------------------------------
# demo: the paper's comparison on the toy data set, and the gates checked against its truth


def demo(args):
    """--demo: the CLIP baseline (raw text only) and ALIP, trained the same way (data, seed, steps), for each
    of --seeds; then one table (mean ± sd over the seeds) and one sentence per gate."""
    # The demo's matrices are 64 wide: more threads gain little and spin while the loader's worker wants a core.
    # One thread also makes the numbers the same on any CPU.
    torch.set_num_threads(1)
    seeds = args.seeds or [args.seed]
    finals = {"clip": [], "alip": []}
    try:
        for seed in seeds:
            for loss in finals:
                name = loss if args.seeds is None else f"{loss}-s{seed}"
                run_args = argparse.Namespace(**{**vars(args), "loss": loss, "seed": seed,
                                                 "output": os.path.join(args.output, name)})
                if not train(run_args):
                    return
                finals[loss].append(evaluation.final_metrics(run_args.output))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    runs = [os.path.join(args.output, loss if args.seeds is None else f"{loss}-s{seeds[0]}") for loss in finals]
    print(f"curves: {evaluation.plot_runs(runs, os.path.join(args.output, 'curves.png'))}")
    gates = "" if args.gates == "all" else f" (gates: {args.gates})"
    print(evaluation.compare_runs({"CLIP (raw text only)": finals["clip"], f"ALIP{gates}": finals["alip"]}))


# -----------------------------------------------------------------------------
# benchmark: training throughput on synthetic in-memory batches (no data loading)


BENCH_WARMUP = 3  # untimed steps before each timed variant: compilation, allocator, autotuning


def flops_per_sample(cfg, text_len, loss="alip"):
    """Matmul FLOPs of one training sample, forward + backward (3x forward); attention counted as full
    (not halved for the causal mask), patch embedding and projections included, elementwise ops not."""
    def tower(n, w, layers):  # qkv 6nw^2 + out 2nw^2 + mlp 16nw^2, and QK^T + AV 4n^2w, per layer
        return layers * (24 * n * w * w + 4 * n * n * w)
    grid = (cfg.image_size // cfg.patch_size) ** 2
    image = tower(grid + 1, cfg.vision_width, cfg.vision_layers) + 2 * grid * 3 * cfg.patch_size ** 2 * \
        cfg.vision_width + 2 * cfg.vision_width * cfg.embed_dim
    text = tower(text_len, cfg.text_width, cfg.text_layers) + 2 * cfg.text_width * cfg.embed_dim
    return 3 * (image + (2 if loss == "alip" else 1) * text)


def bench(args):
    """Time train_step on synthetic in-memory batches; with --bench-ablate also without text trimming, fused
    attention or the fused loss."""
    run = Run(args)
    cfg, B, device = run.raw_model.config, args.batch_size, run.device
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    text_len = 32  # a typical web alt-text / caption length in tokens, EOT included
    texts = torch.randint(1, 49406, (2 * B, cfg.context_length), device=device)
    texts[:, 0], texts[:, text_len - 1], texts[:, text_len:] = 49406, 49407, 0
    micro = [[images, texts[:B], texts[B:]]]  # one batch, whatever --accum-steps
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (989.0 if run.amp_dtype is not None and any(
        h in name for h in ("H100", "H200")) else None)  # dense bf16/fp16 tensor-core peak of the SXM parts
    flops = flops_per_sample(cfg, text_len, args.loss) * B  # useful work: trimmed text, whatever the variant
    loss = run.objective.loss_fn, run.objective.loss_dtype
    variants = [("as configured", True, None, loss)]
    if args.bench_ablate:
        variants += [("no text trimming (77 tokens)", False, None, loss),
                     ("math attention (no fused SDPA)", True, SDPBackend.MATH, loss),
                     ("reference loss", True, None, (contrastive_loss, None))]
    results = []
    for variant, trim, backend, fn in variants:
        run.raw_model.trim_text, (run.objective.loss_fn, run.objective.loss_dtype) = trim, fn
        with sdpa_kernel(backend) if backend else nullcontext():
            dt = data.time_calls(lambda: train_step(run, micro), calls=args.bench_steps, warmup=BENCH_WARMUP, sync=sync)
        results.append({"device": name, "model": args.model, "batch_size": B, "variant": variant,
                        "precision": run.precision, "loss": run.loss_reason if fn is loss else "reference",
                        "step_ms": dt * 1e3, "samples_per_s": B / dt, "tflops": flops / dt / 1e12,
                        "mfu": flops / dt / 1e12 / peak if peak else None,
                        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
        print(f"{name} {args.model} batch {B}, {variant}: {dt * 1e3:.1f} ms/step, {B / dt:.1f} samples/s, "
              f"{flops / dt / 1e12:.2f} TFLOP/s" + (f", MFU {100 * flops / dt / 1e12 / peak:.1f}%" if peak else ""))
        print(json.dumps(results), flush=True)  # the results so far: a run cut short keeps what it timed

# -----------------------------------------------------------------------------
# entry point


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        bench(args)
    elif args.demo:
        demo(args)
    else:
        train(args)


if __name__ == "__main__":
    data.run_command(main)
