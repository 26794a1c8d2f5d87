"""A toy pipeline model for executor tests: residual tanh blocks with global names."""
from __future__ import annotations

import time

import torch
from torch import nn

HIDDEN, IN_DIM, OUT_DIM, SEQ, MBS = 8, 5, 3, 4, 2


class Sleep(torch.autograd.Function):
    """Identity that sleeps in forward and backward, to give stages a known duration."""

    @staticmethod
    def forward(ctx, x, forward_s: float, backward_s: float):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class ToyBlock(nn.Module):
    def __init__(self, sleep_s: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.lin = nn.Linear(HIDDEN, HIDDEN)
        self.sleep_s = sleep_s

    def forward(self, x_bsh, positions_bs):
        # positions reach every chunk, as in the real model (RoPE)
        y = x_bsh + torch.tanh(self.lin(x_bsh) + 0.1 * torch.sin(positions_bs.float())[..., None])
        return Sleep.apply(y, *self.sleep_s) if any(self.sleep_s) else y


class ToyChunk(nn.Module):
    """Layers `layer_ids`; the first chunk owns `embed`, the last `head`."""

    def __init__(self, layer_ids, first: bool, last: bool, sleep_s=(0.0, 0.0)):
        super().__init__()
        self.first, self.last = first, last
        self.embed = nn.Linear(IN_DIM, HIDDEN) if first else None
        self.layers = nn.ModuleDict({str(i): ToyBlock(sleep_s) for i in layer_ids})
        self.head = nn.Linear(HIDDEN, OUT_DIM) if last else None

    def forward(self, inputs, positions_bs):
        x = self.embed(inputs) if self.first else inputs
        for layer in self.layers.values():
            x = layer(x, positions_bs)
        return self.head(x) if self.last else x


def full_model(num_layers: int, seed: int = 0) -> ToyChunk:
    torch.manual_seed(seed)
    return ToyChunk(range(num_layers), True, True)


def chunk_of(full: ToyChunk, layer_ids, first: bool, last: bool) -> ToyChunk:
    """The chunk holding `layer_ids`, with the full model's values (global names)."""
    chunk = ToyChunk(layer_ids, first, last)
    chunk.load_state_dict({k: v for k, v in full.state_dict().items()
                           if k in chunk.state_dict()}, strict=True)
    return chunk


def microbatches(m: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"inputs": torch.randn(MBS, SEQ, IN_DIM, generator=gen),
             "positions": torch.arange(i * SEQ, (i + 1) * SEQ).expand(MBS, SEQ),
             "labels": torch.randn(MBS, SEQ, OUT_DIM, generator=gen)} for i in range(m)]


def make_loss_fn(m: int):
    """Sum of squared errors / all label elements of all micro-batches (the global-count
    normalisation of the loss convention)."""
    total = m * MBS * SEQ * OUT_DIM

    def loss_fn(out, batch):
        return ((out - batch["labels"]) ** 2).sum() / total
    return loss_fn


def reference(num_layers: int, batches: list[dict]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per-micro-batch losses and accumulated grads of the whole model in one process."""
    model = full_model(num_layers)
    loss_fn = make_loss_fn(len(batches))
    losses = []
    for batch in batches:
        loss = loss_fn(model(batch["inputs"], batch["positions"]), batch)
        loss.backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}
