"""The optimizer step a method sees: zero_grad, backward, step.

It hides the optimizer, gradient clipping, the non-finite loss check and, under
torchrun, the averaging of gradients across ranks. Methods call it once per update, so
alternating per-modality updates read as Algorithm 1 reads.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grad_norm_


class NonFiniteLoss(RuntimeError):
    """A loss was NaN or infinite; the loop adds where it happened."""


class Step:
    """One optimizer behind ``zero_grad()``, ``backward(loss)`` and ``step()``.

    Under torchrun the model is not wrapped in DistributedDataParallel: an alternating
    update touches only Enc_m and LoRA_m, which DDP would either hang on or search for
    with ``find_unused_parameters`` every step. Instead ``step()`` all-reduces, in one
    flat bucket, exactly the gradients this update produced (plus a non-finite flag), so
    every rank calls the same collectives in the same order and no bandwidth is spent
    on parameters the update does not touch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0):
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.updates = 0
        self._finite: torch.Tensor | None = None  # on the device: no host sync per backward

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._finite = None

    def backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        loss.backward()

    def step(self, momentum: bool = True) -> None:
        """Average gradients over ranks, check them, clip, and update the parameters.

        ``momentum=False``: a plain SGD step, p <- p - lr (g + weight_decay p), at each
        group's learning rate and weight decay, that neither reads nor changes the
        optimizer's momentum buffers (CCAT's ``secondary_optimizer: plain``).
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        device = params[0].device if params else "cpu"
        bad = torch.zeros(1, device=device) if self._finite is None else \
            (~self._finite).to(device, torch.float32).reshape(1)
        if self.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [bad])
            dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad) / self.world)
                offset += p.numel()
            bad = flat[-1:]
        if bad.item() > 0:  # the step's one host sync: the check of every loss since zero_grad
            raise NonFiniteLoss("the loss is not finite")
        if self.grad_clip > 0:
            clip_grad_norm_(params, self.grad_clip)
        if momentum:
            self.optimizer.step()
        else:
            self._plain_step()
        self.updates += 1

    @torch.no_grad()
    def _plain_step(self) -> None:
        """p <- p - lr (g + weight_decay p) for every parameter with a gradient."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + group.get("weight_decay", 0.0) * p, alpha=-group["lr"])

    def all_sum(self, value: float) -> float:
        """``value`` summed over ranks (the value itself without torchrun)."""
        if self.world == 1:
            return value
        total = torch.tensor([float(value)], device=self._device())
        dist.all_reduce(total)
        return total.item()

    def _device(self) -> torch.device:
        return self.optimizer.param_groups[0]["params"][0].device


def host_floats(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """``values`` as Python floats, every tensor among them fetched in one device-to-host
    copy (one sync, not one per ``.item()``). The floats equal ``.item()``'s: each scalar
    is widened to float32 on the device, which is exact for float16, bfloat16, float32 and
    counts below 2**24."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    fetched = dict(zip(tensors, torch.stack([t.detach().reshape(()).float()
                                             for t in tensors.values()]).tolist())) \
        if tensors else {}
    return {k: fetched[k] if k in fetched else float(v) for k, v in values.items()}
