"""Several processes (torchrun) training as one: the loss is that of the global batch.

- The paper trains on one GPU with a batch of 16 pairs.
- Under torchrun each process encodes its share of the batch.
- The embeddings of all processes are gathered before the loss,
  so HMMC's hardest negatives are searched in the global batch,
  as on one device (docs/method.md §4).
"""
import os
from datetime import timedelta
from typing import Callable, List, NamedTuple, Optional, TypeVar

import torch
import torch.distributed as dist

from ..weights.download import DownloadError

T = TypeVar("T")


class Processes(NamedTuple):
    """This process among torchrun's: how many, its rank, its rank on this machine, its device."""
    world_size: int
    rank: int
    local_rank: int
    device: str


def start(device: str, batch_size: Optional[int],
          timeout: Optional[timedelta] = None) -> Processes:
    """(--device, global batch) -> Processes: torchrun's environment read, the device made current.

    - The process group is started when there are several processes.
    - Each then runs on cuda:<local rank> on CUDA.
    - batch_size None: each process has its own batch (search.py index), nothing to divide.
    - timeout: how long a collective waits for the slowest process (default torch's).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    named = torch.device(device)
    if world == 1 and named.type == "cuda" and named.index is not None:
        # cuda:N: current before anything is allocated there (the pin-memory thread, GradScaler,
        # the CUDA-graph pool and autocast all use the current device, cuda:0 until told otherwise)
        torch.cuda.set_device(device)
    if world > 1:
        # before the process group: every process stops alike, none waits
        if batch_size is not None and batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is the global batch; it must divide by "
                             f"the {world} processes")
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                **({"timeout": timeout} if timeout else {}))
    return Processes(world, rank, local_rank, device)


# the errors a process may meet in a check, rebuilt by name in the processes that did not
SHARED_ERRORS = {e.__name__: e for e in (ValueError, FileExistsError, FileNotFoundError,
                                         FloatingPointError, OSError, DownloadError)}


def together(step: Callable[[], T], every_rank: bool = True) -> T:
    """`step` -> `step()`'s result, or on every process the same error: one outcome for all.

    - `step()` runs on every process (every_rank) or on rank 0 alone.
    - If it failed anywhere, every process raises the error of the lowest failing rank,
      which that rank alone reports (`reported_here`).
    - No process is left waiting at a barrier for one that stopped.
    - Without torchrun it is `step()`.
    """
    result, error = None, None
    if every_rank or not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = step()
        except Exception as e:  # anything: the others must hear of it, or they wait forever
            error = e
    if dist.is_initialized():
        outcome = None if error is None else (type(error).__name__, str(error))
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if failed:
            first, (kind, message) = failed[0]
            if error is None:  # another process failed: the same error here, reported there
                known = kind in SHARED_ERRORS
                error = SHARED_ERRORS.get(kind, RuntimeError)(
                    message if known else f"rank {first}: {kind}: {message}")
            error.reported_by = first
    if error is not None:
        raise error
    return result


def reported_here(error: BaseException) -> bool:
    """error -> whether this process prints it: the rank `together` named, else rank 0.

    An error met on every rank alike, such as a bad flag, is printed once.
    """
    return getattr(error, "reported_by", 0) == int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def from_rank0(obj: T) -> T:
    """Rank 0's `obj` on every process (a picklable object); without torchrun `obj`."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def everyone(obj: T) -> List[T]:
    """[rank 0's obj, rank 1's, ...] on every process; without torchrun [obj]."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (world * B, D): all ranks' rows.

    This rank's rows keep their gradient; the others are constants.
    """
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def counted_once(t: torch.Tensor) -> torch.Tensor:
    """t -> `t` itself, whose gradient every rank takes 1/world of.

    - A parameter the loss reads directly (not through this rank's rows, like logit_scale)
      gets the whole gradient on every rank.
    - After the backward's x world and DDP's mean it must count once, not world times.
    """
    if not dist.is_initialized():
        return t
    return t + (t.detach() - t) * (1 - 1 / dist.get_world_size())
