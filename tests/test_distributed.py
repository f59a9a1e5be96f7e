"""Two gloo processes on the CPU must train exactly like one process on the same global batch.

In float64: two processes sum in another order than one (and another CPU in another order again), so in fp32
the two runs differ by rounding alone. In float64 that rounding is ~1e-16 relative, and anything above ~1e-10
is a real difference (a sample counted twice, a missing all-gather gradient, a wrong offset).
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import alip
from test_alip import random_tokens

GLOBAL_BATCH = 8
RTOL = 1e-10  # float64 sums of a few thousand terms in another order: ~1e-13 relative; a real bug is >= 1e-3


def global_batch():
    gen = torch.Generator().manual_seed(11)
    S = alip.PRESETS["tiny"].image_size
    images = torch.randn(GLOBAL_BATCH, 3, S, S, generator=gen, dtype=torch.float64)
    torch.manual_seed(12)
    text = random_tokens([3, 9, 2, 14, 5, 5, 7, 1])
    caption = random_tokens([6, 4, 6, 4, 6, 4, 6, 4])
    return images, text, caption


def step(model, images, text, caption, world_size, rank, loss):
    x, tc = model(images, torch.cat([text, caption]))
    objective = alip.Objective(alip.Gates(init=0.1), bipath=loss == "alip", rank=rank, world_size=world_size)
    out = alip.alip_loss(x, *tc.chunk(2), alip.capped_scale(alip_module(model).logit_scale), objective)
    out.loss.backward()
    return out.loss.detach(), out.weights, objective.gates.H_tc.clone()


def alip_module(model):
    return model.module if isinstance(model, DDP) else model


def worker(rank, world_size, tmp, loss):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DDP(alip.create_model("tiny").double())
    n = GLOBAL_BATCH // world_size
    images, text, caption = (b[rank * n:(rank + 1) * n] for b in global_batch())
    out, weights, H = step(model, images, text, caption, world_size, rank, loss)
    torch.save({"loss": out, "weights": weights, "H": H,
                "grads": {k: p.grad for k, p in model.module.named_parameters()}}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    for loss in ("alip", "clip"):
        mp.spawn(worker, args=(2, str(tmp_path), loss), nprocs=2, join=True)
        torch.manual_seed(0)
        model = alip.create_model("tiny").double()
        out, weights, H = step(model, *global_batch(), 1, 0, loss)
        ranks = [torch.load(f"{tmp_path}/rank{r}.pt", weights_only=True) for r in range(2)]
        # the global loss is the mean of the ranks' local losses; DDP averages the ranks' gradients
        torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, out, rtol=RTOL, atol=0)
        if loss == "alip":  # gates see the global batch: the same weights and running means on every rank
            for r in ranks:
                torch.testing.assert_close(r["H"], H, rtol=RTOL, atol=0)
                for a, b in zip(r["weights"], weights):
                    torch.testing.assert_close(a, b, rtol=RTOL, atol=0)
        for name, p in model.named_parameters():
            for r in ranks:
                g = r["grads"][name]
                # relative to the tensor's largest gradient: an element that is ~0 by cancellation may
                # carry a larger relative error than the float64 rounding of the sums it came from
                torch.testing.assert_close(g, p.grad, rtol=0, atol=RTOL * p.grad.abs().max().item(),
                                           msg=lambda m: f"{loss} {name}: max diff {(g - p.grad).abs().max():.3e}")
        os.remove(f"{tmp_path}/rendezvous") if os.path.exists(f"{tmp_path}/rendezvous") else None
