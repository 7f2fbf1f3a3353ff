"""Data-parallel training: the process group torchrun set up (NCCL on GPUs, gloo on CPU), DistributedDataParallel
wrappers, synchronised batch norm, and the logged scalars' all-reduce.

The gradient sync is torch's DistributedDataParallel: bucketed all-reduces overlapping the backward. Two features
of the step shape how it is used (mfim.training.trainer):

* the encoder runs twice per step (source and target): the DDP wrapper is the whole swapper, so both passes are one
  DDP forward and each parameter's gradient reaches its hook once, summed by autograd;
* D's lazy R1 is a double backward: the penalty's gradient w.r.t. the real images (torch.autograd.grad, which fills
  no .grad and fires no DDP hook) then one .backward() of loss + penalty, whose parameter gradients DDP reduces.

Batch norm (the paper's IR-SE50 body) is synchronised across ranks, so every rank normalises with the statistics of
the global batch and the update equals one process's on the global batch: torch.nn.SyncBatchNorm on GPUs; on CPU
(gloo), where torch's kernels for it do not exist, :class:`GlooSyncBatchNorm` computes the same statistics with two
differentiable all-reduces (torch's functional collectives). GroupNorm (the embedded default's small body) needs none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mfim.runtime import exit_with_parent


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); otherwise single process."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        exit_with_parent()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in a one-process run); every rank must call this."""
    if info.world <= 1:
        return [obj]
    gathered: list = [None] * info.world
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's parameters and buffers to every rank (once, after rank 0 alone loaded a warm start)."""
    if info.world <= 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm synchronised across the ranks of a CPU (gloo) run, where torch.nn.SyncBatchNorm has no kernels
    (and DDP refuses it on CPU modules): in training it normalises with the global batch's mean and biased variance
    (two passes, each one differentiable all-reduce of per-channel sums) and updates the running
    statistics with the unbiased variance and momentum, as torch's kernels do. Same parameters and buffers as the
    BatchNorm it replaces."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group if getattr(self, "process_group", None) is not None else dist.group.WORLD
        if not (self.training and dist.is_initialized() and dist.get_world_size(group) > 1):
            return super().forward(x)
        # differentiable (its backward all-reduces the gradient): torch's functional collectives
        from torch.distributed._functional_collectives import all_reduce as functional_all_reduce

        def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
            return functional_all_reduce(t, "sum", group)

        self._check_input_dim(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype), group)
        mean = all_reduce(x.sum(dims), group) / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims), group) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d of ``module`` synchronised across ranks, keeping its parameters and buffers (state dicts and
    checkpoints are unchanged): torch.nn.SyncBatchNorm on GPUs, :class:`GlooSyncBatchNorm` on CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            m.__class__ = GlooSyncBatchNorm
    return module


def wrap_ddp(module: nn.Module, device: torch.device, info: DistInfo, static_graph: bool = False) -> nn.Module:
    """``module`` under DistributedDataParallel (world > 1), else itself. Buffers are synced once, at construction,
    not at each forward: synchronised batch norm keeps its running statistics equal on every rank, and the frozen
    generator's are constants. ``static_graph``: the same parameters take part in every step (DDP then finds the
    ones a configuration never uses, e.g. configuration A's unused map lateral, in the first step instead of
    failing at the second, and does not search the graph each step as find_unused_parameters would)."""
    if info.world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False, static_graph=static_graph)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over ranks of a 1-D tensor (one collective for all logged scalars of a log step)."""
    if info.world <= 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / info.world


def device_and_dist(params: dict) -> tuple[torch.device, DistInfo]:
    """The stage's device (``project.device``; under torchrun each rank its own GPU), its CPU threads and the process
    group it joins (one process unless torchrun started it)."""
    from mfim.config import lookup
    from mfim.runtime import configure_threads, pick_device

    device = pick_device(lookup(params, "project.device"))
    configure_threads(lookup(params, "project.threads"))
    dist = init_from_env(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device, dist
