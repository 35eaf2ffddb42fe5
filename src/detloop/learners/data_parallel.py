"""This process's part in a data-parallel training (``train.workers > 1``).

``torch.distributed`` is set up by the caller (Ray Train's ``TorchTrainer``: gloo on CPU, nccl
on GPU); ``train_model`` then trains the same model on every rank with these rules, so that N
workers with a global batch of B images take the steps one worker takes with B:

- **Batches.** Every rank draws the same global batches (``learners.streams``, seeded as
  always) and keeps its share: the labeled and the pseudo-labeled part of each batch are each
  split round-robin over the ranks. Augmentation is seeded per image and epoch, so an image is
  augmented the same whichever rank reads it.
- **Loss.** The detection loss is normalised by the positive anchors of the whole global batch
  (one all-reduce per step), and each rank's loss is scaled by N: DDP averages gradients over
  ranks, so the update is the gradient of the global batch's loss, exactly.
- **BatchNorm.** Statistics over the global batch (``sync_batchnorm``: sums all-reduced with
  autograd; torch's ``SyncBatchNorm`` refuses CPU tensors).
- **Decisions.** A non-finite loss skips the step on every rank if on any; early stopping is
  decided by rank 0 and broadcast; only rank 0 writes checkpoints; every rank calls
  ``report`` after each partial checkpoint (Ray Train's ``report`` is a barrier).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

_T = TypeVar("_T")


@dataclass(frozen=True)
class DataParallel:
    """A rank of a data-parallel training.

    Args:
        rank: this process's rank; 0 writes the checkpoints.
        world_size: N, the number of ranks.
        report: called by every rank after each partial checkpoint with the step and, on
            rank 0, the checkpoint directory (Ray Train's ``report``).
        resume_from: the checkpoint to resume from (the last one reported before a restart);
            None: the partial checkpoint in the run directory, if any.
        after_step: called by every rank after each step (fault injection).
        sync_bn: BatchNorm statistics over the global batch.
    """

    rank: int
    world_size: int
    report: Callable[[int, Path | None], None] | None = None
    resume_from: Path | None = None
    after_step: Callable[[int], None] | None = None
    sync_bn: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Sequence[int], n_labeled: int) -> list[int]:
        """This rank's images of a global batch: every N-th of the labeled part (indices below
        ``n_labeled``) and of the pseudo-labeled part, labeled first."""
        labeled = [i for i in batch if i < n_labeled]
        pseudo = [i for i in batch if i >= n_labeled]
        return [*labeled[self.rank :: self.world_size], *pseudo[self.rank :: self.world_size]]

    def all_sum(self, values: Tensor) -> Tensor:
        """``values`` summed over ranks (no gradient)."""
        out = values.detach().clone()
        dist.all_reduce(out)
        return out

    def mean_values(self, values: tuple[float, ...]) -> tuple[float, ...]:
        """The mean over ranks of each finite value (NaN where no rank has one)."""
        v = torch.tensor(values, dtype=torch.float64)
        finite = torch.isfinite(v)
        summed = self.all_sum(torch.cat([torch.where(finite, v, 0.0), finite.double()]))
        total, count = summed[: len(values)], summed[len(values) :]
        mean = torch.where(count > 0, total / count.clamp(min=1), float("nan"))
        return tuple(float(x) for x in mean)

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank."""
        return bool(self.all_sum(torch.tensor([0.0 if flag else 1.0]))[0] == 0)

    def from_main(self, value: _T) -> _T:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        box: list[object] = [value]
        dist.broadcast_object_list(box, src=0)
        return cast(_T, box[0])


class _SyncBatchNormMixin(nn.Module):
    """BatchNorm (and timm's BatchNormAct) whose training statistics are those of the global
    batch: per-channel counts, sums and sums of squares all-reduced with autograd, so the
    gradient flows through the other ranks' statistics as in one large batch."""

    def forward(self, x: Tensor) -> Tensor:
        bn: nn.BatchNorm2d = self  # type: ignore[assignment]
        if not (bn.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)  # type: ignore[no-any-return]
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        wide = x.double()  # E[x²] − E[x]² loses digits in float32
        stats = torch.cat([wide.sum(dims), wide.square().sum(dims), count])
        with warnings.catch_warnings():  # deprecated, but the differentiable one of torch 2.14
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # type: ignore[no-untyped-call]
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean.square()).clamp(min=0)
        _update_running(bn, mean.detach(), var.detach() * n / (n - 1).clamp(min=1))
        shape = [1, c, *[1] * (x.dim() - 2)]
        y: Tensor = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape) + bn.eps).to(
            x.dtype
        )
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        for after in ("drop", "act"):  # timm's BatchNormAct2d
            layer = getattr(self, after, None)
            if layer is not None:
                y = torch.as_tensor(layer(y))
        return y


def _update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> None:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(var.to(bn.running_var.dtype), alpha=m)


_SYNC_CLASSES: dict[type, type] = {}


def sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm layer of ``model`` use global-batch statistics in training (the
    layers keep their parameters, buffers and state-dict keys); returns how many."""
    n = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, _SyncBatchNormMixin
        ):
            if cls not in _SYNC_CLASSES:
                _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (_SyncBatchNormMixin, cls), {})
            module.__class__ = _SYNC_CLASSES[cls]
            n += 1
    return n
