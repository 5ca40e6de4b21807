"""Several processes (torchrun) training as one: the loss is that of the global batch.

The paper trains on one GPU with a batch of 16 pairs. Under torchrun each process encodes its
share of the batch; the embeddings of all processes are gathered before the loss, so HMMC's
hardest negatives are searched in the global batch, as on one device (docs/method.md §4).
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Processes(NamedTuple):
    """This process among torchrun's: how many, its rank, its rank on this machine, its device."""
    world_size: int
    rank: int
    local_rank: int
    device: str


def start(device: str, batch_size: int) -> Processes:
    """Read torchrun's environment, make the device current, and start the process group when
    there are several processes (each then on cuda:<local rank> on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    named = torch.device(device)
    if world == 1 and named.type == "cuda" and named.index is not None:
        # cuda:N: current before anything is allocated there (the pin-memory thread, GradScaler,
        # the CUDA-graph pool and autocast all use the current device, cuda:0 until told otherwise)
        torch.cuda.set_device(device)
    if world > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is the global batch; it must divide by "
                             f"the {world} processes")
    return Processes(world, rank, local_rank, device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (world * B, D); this rank's rows keep their gradient, the others are
    constants."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def counted_once(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, whose gradient every rank takes 1/world of. A parameter the loss reads directly
    (not through this rank's rows, like logit_scale) gets the whole gradient on every rank; after
    the backward's x world and DDP's mean it must count once, not world times."""
    if not dist.is_initialized():
        return t
    return t + (t.detach() - t) * (1 - 1 / dist.get_world_size())
