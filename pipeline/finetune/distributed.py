"""The few things the training loop needs to know about its siblings: one :class:`Workers` object.

The loop (:func:`pipeline.finetune.train.fit`) is written once against this
object. Its launchers differ only in how they build it:

- in-process (the default): :func:`single`, one worker, no process group;
- under ``torchrun``: :func:`from_torchrun`, from the launcher's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), gloo on the CPU and nccl on CUDA;
- under Ray Train: :func:`from_ray`, in each worker of a ``TorchTrainer``,
  which has set up the process group already.

What makes results independent of the number of workers lives in the loop and
the sampler (:class:`pipeline.finetune.data.GlobalBatches`): the same global
batches in the same order, each photo's augmentation seeded by the photo and the
epoch, the loss normalised by the global batch. Batch norm keeps its ImageNet
statistics in eval mode (:func:`~pipeline.finetune.network.set_train_mode`), so
no SyncBatchNorm is needed: there are no batch statistics to synchronise.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError

#: Environment variables torchrun (torch.distributed.run) sets in each process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Workers:
    """This process's place among the training workers.

    Attributes:
        engine: ``local``, ``torchrun`` or ``ray``: recorded in the report.
        rank, world_size: this worker and how many there are; rank 0 alone writes files.
        device: where this worker trains.
    """

    engine: str
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the workers (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # nccl reduces CUDA tensors only
        torch.distributed.all_reduce(t)
        return t.tolist()

    def agree(self, value: int, what: str) -> None:
        """Refuse to go on when the workers disagree on ``value`` (say, the step a checkpoint resumes at)."""
        if not self.distributed:
            return
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise PipelineError(f"the {self.world_size} fine-tuning workers disagree on {what} "
                                f"({-int(t[1])} to {int(t[0])}); do they share the project folder?")

    def gather(self, arrays: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, ...]]:
        """Every worker's ``arrays``, in rank order, on every worker."""
        if not self.distributed:
            return [arrays]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, arrays)
        return out

    def wrap(self, net: nn.Module) -> nn.Module:
        """The module that trains: ``net`` itself, or DDP around it (built again whenever what trains changes:
        ``progressive`` unfreezing).

        No buffer sync before each forward pass: batch norm's statistics never
        change (eval mode), so there is nothing to send.
        """
        if not self.distributed:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.14 renamed the switch; older releases know only the first name.
        quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                 else {"broadcast_buffers": False})
        return ddp(net, device_ids=ids, **quiet)


def single(device: torch.device) -> Workers:
    return Workers("local", 0, 1, device)


def worker_device(requested: torch.device, local_rank: int, cuda_devices: int) -> torch.device:
    """Worker ``local_rank``'s device: the CPU, or its own GPU of this node's ``cuda_devices``.

    ``requested`` is the placement the params resolved to (``cuda`` or ``cpu``); a
    worker on CUDA takes ``cuda:<local_rank>``, one GPU each, as torchrun and Ray
    Train lay them out.
    """
    if requested.type != "cuda":
        return torch.device("cpu")
    if local_rank >= cuda_devices:
        raise PipelineError(f"fine-tuning worker {local_rank} of this node has no GPU: the node has "
                            f"{cuda_devices}; start at most {cuda_devices} workers a node, or set finetune.device: cpu")
    return torch.device("cuda", local_rank)


def launched_by_torchrun(env=os.environ) -> bool:
    return all(k in env for k in TORCHRUN_ENV)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def from_torchrun(requested: torch.device, env=os.environ) -> Workers:
    """This process's :class:`Workers` under torchrun; joins the process group (gloo on CPU, nccl on CUDA)."""
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device = worker_device(requested, local, torch.cuda.device_count() if requested.type == "cuda" else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        from torch.distributed.rendezvous import rendezvous

        store, _, _ = next(rendezvous("env://", rank, world))
        # After torchrun restarts its workers, the agent's store still holds the dead round's
        # addresses: the new round's keys go under a prefix of their own.
        store = torch.distributed.PrefixStore(f"finetune/round_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        torch.distributed.init_process_group(backend_for(device), store=store, rank=rank, world_size=world)
    return Workers("torchrun", rank, world, device)


def from_ray(requested: torch.device) -> Workers:
    """This Ray Train worker's :class:`Workers` (its process group is Ray's)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if requested.type == "cuda" else torch.device("cpu")
    return Workers("ray", ctx.get_world_rank(), ctx.get_world_size(), device)


def leave(workers: Workers) -> None:
    """Leave the process group this module joined (torchrun's); Ray tears down its own."""
    if workers.engine == "torchrun" and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
