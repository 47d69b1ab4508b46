"""Data-parallel training on torch.distributed: `torchrun --nproc-per-node N -m sekft.sft ...`.

Every rank loads the whole frozen base (float or 4-bit) on its own device and reads the whole
data, so every rank computes the same plan of optimizer steps (`sekft.pack`). One step's
packed rows are split across the ranks, in the plan's order and balanced by tokens
(`share`); each rank runs forward and backward on its rows only. The step is the step one
process would take:

- the loss of a step is the sum over all its trained tokens divided by the step's global
  trained-token count, so the count is summed over the ranks first (`sum_count`), and each
  rank divides its rows' loss sums by that global count before backward;
- the LoRA gradients are then summed over the ranks (`sum_gradients`), not averaged: each
  rank's gradient is already its share of the global mean. Dividing by the world size, as
  DistributedDataParallel does, would weigh a token by how its rank's rows were packed.

The gradients are reduced by hand, one all-reduce of the trainable parameters' gradients
flattened into one float32 buffer, rather than by wrapping the model in
DistributedDataParallel: only a few MB of LoRA gradients travel, so overlapping them with
the backward gains little, while DDP's hooks fire during `torch.utils.checkpoint`
recomputation (--grad-ckpt: "marked ready twice" / unused-parameter errors), only see
`forward()` (the loop calls `model.hidden` and the loss on `output_weight()` directly), and
cannot cope with a rank that has no row in a step. After the reduction every rank holds the
same gradients, clips and steps identically, and the weights stay equal without a broadcast.

Collectives run with a timeout (`--dist-timeout`): a rank that dies or stalls makes the
others fail with one line (`lost`) within that time; gloo notices a killed peer at once.

Outside torchrun (no WORLD_SIZE in the environment, or 1) nothing here communicates: the
single-process group does no collective at all.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sekft.errors import TrainError


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks: `rank` of `world`, `local_rank` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that writes files and prints progress."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: `cuda` becomes `cuda:LOCAL_RANK` under torchrun,
        so a 4-bit base is quantized on its own rank's GPU, not all on GPU 0."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def sum_count(self, n: int) -> int:
        """The sum of `n` over the ranks (the step's global trained-token count)."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.float64, device=_comm_device())
        _all_reduce(t, self, "the trained-token count")
        return int(t.item())

    def sum_gradients(
        self, params: list[torch.nn.Parameter], loss_sum: float, stop: bool
    ) -> tuple[float, bool]:
        """Sum every parameter's gradient over the ranks, in place (a missing gradient counts
        as zero: a rank may have had no row this step). Also sums `loss_sum` and agrees on
        `stop` (asked on any rank), so all ranks see the step as the last alike. Returns
        (global loss_sum, stop on any rank)."""
        if self.world == 1:
            return loss_sum, stop
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        # float32 whatever the parameters' dtype: summing bf16 gradients across ranks would
        # round at every hop.
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor([loss_sum, float(stop)], device=grads[0].device)])
        flat = flat.to(_comm_device())
        _all_reduce(flat, self, "the gradients")
        flat = flat.to(grads[0].device)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return float(flat[-2]), bool(flat[-1] > 0)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a stop asked on one rank stops them all)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=_comm_device())
        _all_reduce(t, self, "the stop requests")
        return bool(t.item() > 0)

    def sum_pair(self, total: float, count: int) -> tuple[float, int]:
        """(sum of `total`, sum of `count`) over the ranks: a loss summed over their rows."""
        if self.world == 1:
            return total, count
        t = torch.tensor([total, count], dtype=torch.float64, device=_comm_device())
        _all_reduce(t, self, "the validation loss")
        return float(t[0]), int(t[1])

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (after rank 0 saved: all resume from its save)."""
        if self.world > 1:
            _collective(lambda: dist.barrier(), self, what)


SINGLE = Group()


def _comm_device() -> torch.device:
    """Where collective buffers live: NCCL reduces on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, group: Group, what: str) -> None:
    _collective(lambda: dist.all_reduce(t), group, what)


def _collective(op, group: Group, what: str) -> None:
    """Run collective `op`; a peer that died or timed out becomes one TrainError line."""
    try:
        op()
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # gloo's source location
        raise TrainError(
            f"rank {group.rank} of {group.world}: lost the other ranks while summing {what} "
            f"({first}); another rank failed or stalled past --dist-timeout: see its message"
        ) from None


def launched() -> bool:
    """Whether this process is one of several ranks started by torchrun (or set up alike)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Group:
    """This process's Group: the initialised process group's, else the single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def share(row_tokens: list[int], world: int, rank: int) -> list[int]:
    """The indices of the rows `rank` trains of one step whose rows have `row_tokens` tokens.

    Contract: the ranks' shares, for rank = 0..world-1, are consecutive runs of row indices
    that together cover 0..len(row_tokens)-1 in order (the global data order), rank 0 first;
    each rank's run ends where the cumulative token count comes closest to its equal share
    (rank+1)/world of the step's tokens. A rank's share may be empty (fewer rows than ranks).
    """
    prefix = list(itertools.accumulate(row_tokens, initial=0))
    cuts = [0]
    for k in range(1, world):
        target = prefix[-1] * k / world
        # On a tie the later cut: the earlier rank takes the row.
        cuts.append(min(range(cuts[-1], len(row_tokens) + 1),
                        key=lambda i: (abs(prefix[i] - target), -i)))
    cuts.append(len(row_tokens))
    return list(range(cuts[rank], cuts[rank + 1]))


@contextlib.contextmanager
def process_group(device: str, timeout_s: float) -> Iterator[Group]:
    """Join the ranks torchrun started (nccl for a CUDA `device`, else gloo), with collectives
    timing out after `timeout_s` seconds; yields this process's Group, and SINGLE outside
    torchrun. The group is torn down on the way out, unless it failed (a broken group's
    teardown can itself wait on the lost peer)."""
    if not launched() or dist.is_initialized():
        yield current()
        return
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise TrainError(f"cannot join the other ranks ({str(e).strip()[:200]}); launch with "
                         "torchrun --nproc-per-node N, or without it for one process") from None
    yield current()
    dist.destroy_process_group()


def left_broken() -> bool:
    """True when this process still holds a process group: `process_group` left it up because
    the run failed inside it (a lost peer, say)."""
    return dist.is_available() and dist.is_initialized()
