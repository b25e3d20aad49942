"""The meta-batch mean over every task of every rank: one flattened all-reduce per outer step.

Rank r holds B_r tasks with per-task gradients g_{r,i} and query losses ℓ_{r,i}; every rank
contributes one vector [Σ_i g_{r,i} (flattened), Σ_i ℓ_{r,i}, B_r, failed_r], one SUM all-reduce
adds them, and every rank divides by N = Σ_r B_r:

    ḡ = (1/N) Σ_r Σ_i g_{r,i},    ℓ̄ = (1/N) Σ_r Σ_i ℓ_{r,i}

— the mean over the union of tasks, each rank weighted by its task count, identical on every
rank. A rank whose tasks failed still joins the all-reduce (flagged), so that no rank waits
forever and every rank raises; nothing is written anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor

from gradcheck.parameters import flat, unflat

__all__ = ["ProcessGroup", "check_group", "check_same_parameters", "mean_over_ranks", "withdraw"]

ProcessGroup = dist.ProcessGroup


def check_group(group: object) -> None:
    """Refuse a ``process_group`` that is not a ``torch.distributed`` group of an initialised run."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group is set but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")


def _dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The type every tensor fits in, at least float32 (task counts must be exact)."""
    return reduce(torch.promote_types, (t.dtype for t in tensors.values()), torch.float32)


def check_same_parameters(theta: Mapping[str, Tensor], group: ProcessGroup) -> None:
    """Refuse to start when the ranks' meta-parameters differ (one all-reduce of [θ, −θ] with MAX)."""
    vector = flat({n: t.to(_dtype(theta)) for n, t in theta.items()})
    both = torch.cat([vector, -vector])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(vector)], -both[len(vector) :]
    if not torch.equal(high, low):
        highs, lows = unflat(high, theta), unflat(low, theta)
        differ = [n for n in theta if not torch.equal(highs[n], lows[n])]
        raise ValueError(
            f"the model's parameters differ across the ranks of process_group ({differ[:3]}…): every rank "
            "must start from the same θ (seed identically, or broadcast rank 0's state_dict)"
        )


def _all_reduce(
    sums: Mapping[str, Tensor] | None,
    loss: Tensor | None,
    count: int,
    like: Mapping[str, Tensor],
    group: ProcessGroup,
) -> Tensor:
    dtype = _dtype(like)
    device = next(iter(like.values())).device
    if sums is None or loss is None:
        body = torch.zeros(sum(t.numel() for t in like.values()) + 1, dtype=dtype, device=device)
        tail = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    else:
        body = torch.cat([flat({n: sums[n].to(dtype) for n in like}), loss.reshape(1).to(dtype)])
        tail = torch.tensor([float(count), 0.0], dtype=dtype, device=device)
    vector = torch.cat([body, tail])
    dist.all_reduce(vector, group=group)
    return vector


def mean_over_ranks(
    sums: Mapping[str, Tensor], loss: Tensor, count: int, group: ProcessGroup
) -> tuple[dict[str, Tensor], Tensor]:
    """(ḡ, ℓ̄) from this rank's per-parameter sums over its ``count`` tasks and its summed loss."""
    vector = _all_reduce(sums, loss, count, sums, group)
    total, failed = vector[-2].item(), vector[-1].item()
    if failed:
        raise RuntimeError(
            f"meta_backward failed on {int(failed)} rank(s) of the process group (see that rank's "
            "error); nothing was written to p.grad"
        )
    mean = unflat(vector[:-3] / total, sums)
    return {n: mean[n].to(sums[n].dtype) for n in sums}, (vector[-3] / total).to(loss.dtype)


def withdraw(like: Mapping[str, Tensor], group: ProcessGroup) -> None:
    """Join this outer step's all-reduce as a rank whose tasks failed (the other ranks then raise)."""
    _all_reduce(None, None, 0, like, group)
