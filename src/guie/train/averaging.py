"""Weight averaging: an exponential moving average during training, and model soups of runs."""
from __future__ import annotations

import torch
from torch import nn

from guie.errors import UserValueError


class EMA:
    """Shadow copies of the trained parameters, updated after every optimizer step.

    Only the parameters the stage trains are tracked (ViT-H in fp32 is 2.5 GB; a head-only stage
    needs a few MB). At the stage's end `swap_in` copies the averages into the model, so its
    evaluation, final checkpoint and export all use the averaged weights.
    """

    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise UserValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for avg, p in zip(self.shadow, self.params, strict=True):
            avg.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap_in(self) -> None:
        for avg, p in zip(self.shadow, self.params, strict=True):
            p.copy_(avg)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise UserValueError(f"EMA state tracks {len(state['shadow'])} tensors, this stage "
                                 f"{len(self.shadow)}: the checkpoint is from another stage config")
        for avg, saved in zip(self.shadow, state["shadow"], strict=True):
            avg.copy_(saved)


@torch.no_grad()
def average_into(model: nn.Module, others: list[nn.Module]) -> nn.Module:
    """A uniform soup: `model`'s floating-point weights become the mean over it and `others`
    (same architecture; 4th place souped fine-tunes of one backbone). Integer buffers (BatchNorm
    counters) are kept from `model`."""
    states = [m.state_dict() for m in others]
    for name, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        for i, state in enumerate(states):
            if name not in state or state[name].shape != value.shape:
                raise UserValueError(f"soup: ingredient {i + 1} has no matching {name!r}")
        total = value.double() + sum(s[name].double() for s in states)
        value.copy_((total / (1 + len(states))).to(value.dtype))
    return model
