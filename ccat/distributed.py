"""torchrun support: process group setup, the device of this rank and its precision,
gathering results."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ccat.errors import CcatError


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


DEVICES = ("auto", "cpu", "cuda")
TRAIN_DEVICE_FIX = "set device=cpu (--set device=cpu) to run it on the CPU"


def check_device(device: str, fix: str = TRAIN_DEVICE_FIX) -> None:
    """Refuse a device this process cannot use in one sentence ending in ``fix`` (how the
    calling command changes the device), not torch's traceback or a silent CPU run."""
    if device not in DEVICES:
        raise CcatError(f"device {device!r} is not one of {', '.join(DEVICES)}; {fix}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CcatError(f"device is cuda, but torch finds no CUDA GPU on this machine (torch "
                        f"{torch.__version__}); {fix}")


def setup(device: str = "auto", fix: str = TRAIN_DEVICE_FIX) -> Context:
    """Join the torchrun process group if there is one (gloo on CPU, NCCL on CUDA), on a
    device :func:`check_device` accepts."""
    check_device(device, fix)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(rank, world, dev)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; exact fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_cpu(deterministic: bool, threads: int) -> None:
    """Exact kernels (see ``RunConfig.deterministic``) and the intra-op thread count."""
    if threads > 0:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    if deterministic or torch.get_num_threads() == 1:
        torch.backends.mkldnn.enabled = False  # see RunConfig.deterministic


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank arrives (nothing without torchrun)."""
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_model(model: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if dist.is_initialized():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, 0)


def average_buffers(model: nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) over ranks."""
    if dist.is_initialized():
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(dist.get_world_size())
