"""Data-parallel healing with torch.distributed, when `vit2trt heal` is launched under `torchrun`.

Every process reads the same images and draws the same batches and augmentations from the same seed;
each trains on its contiguous share of every batch (DDP averages the gradients: NCCL on GPUs, gloo on
CPU) and judges its share of the held-out images (the sums are added up). So N processes take the same
steps as one process given the same global batch, and rank 0 alone writes the result.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...errors import Vit2TrtError


def launched_world() -> int:
    """How many processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def cpu_threads() -> int:
    """The threads a CPU heal trains with: every core, unless OMP_NUM_THREADS pins the count (as it does
    for torch itself), so that a user or a test runner sharing the cores keeps the share it chose."""
    pinned = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(pinned)) if pinned.isdigit() else max(1, os.cpu_count() or 1)


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0) if launched_world() > 1 else 0


@dataclass
class Parallel:
    """This process's place among the processes that heal together (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    backend: Optional[str] = None
    interrupted: bool = False    # Ctrl-C (or torchrun's SIGTERM) arrived; the processes stop together

    @contextmanager
    def interrupts_as_flag(self):
        """With several processes, an interrupt only sets `interrupted`: each process would otherwise stop
        at its own moment, one inside a collective the others never join. Alone, Ctrl-C stays an exception."""
        if self.world == 1:
            yield
            return

        def note(signum, frame) -> None:
            self.interrupted = True

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of n items (the first n % world ranks take one more)."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (1 if self.rank < extra else 0))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over every rank (a copy; float64 on the CPU, so that the order of addition barely matters)."""
        total = tensor.detach().to("cpu", torch.float64).clone()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def largest(self, value: float) -> float:
        """The largest of every rank's value: ranks agree on when to stop and how far to go."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        out = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return float(out[0])

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model whose backward averages gradients over the ranks (the model itself when alone)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # find_unused_parameters: a merge or a dropped token may leave a trainable weight out of a step.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def start(device: torch.device) -> tuple[Parallel, torch.device]:
    """Join the process group torchrun set up (if it did), and the device this rank trains on."""
    world = launched_world()
    if world == 1:
        return Parallel(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise Vit2TrtError(f"torchrun started {world} processes on this machine but PyTorch sees "
                               f"{torch.cuda.device_count()} CUDA devices; use --nproc-per-node at most that.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:   # the cores are shared between the processes of this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
        torch.set_num_threads(max(1, cpu_threads() // local_world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # The judge's sums and the stop decisions are CPU tensors: gloo carries those beside NCCL.
        dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo")
    return Parallel(dist.get_rank(), dist.get_world_size(), backend), device
