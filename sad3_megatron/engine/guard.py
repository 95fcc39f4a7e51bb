"""The non-finite guard: an optimizer step whose loss or gradient norm is not finite on any rank is
skipped on every rank, and the ranks agree on stopping (preemption) at the same point.

Where the decision is made, per DeepSpeed layout (deepspeed 0.19):
- ZeRO-1/2/3 (and pipelines under ZeRO-1): DeepSpeed's ZeRO optimizers compute the global gradient
  norm before touching the weights and skip the step when it is not finite ("overflow"); the engine
  then counts `engine.skipped_steps` and holds the LR schedule. sad3 relies on that, and its inner
  optimizer (`GuardedAdamW`) only folds the loss and stop flags into one tiny all-reduce.
- ZeRO-0 (plain data parallel, TP, pipelines under ZeRO-0): the engine calls the torch optimizer
  directly, with no check. `GuardedAdamW.step` checks the norm of the (already reduced) gradients
  itself, all-reduces the flag with the loss and stop flags, and on a bad step sets `overflow`,
  which the engine reads exactly as it reads the ZeRO optimizers': skip counted, LR held, grads zeroed.
So in every layout a skipped step leaves weights, optimizer state, LR schedule and EMA unchanged,
its batch is dropped, and the step counter moves on. The one collective runs at the point the
optimizer step needs it, where DeepSpeed's own step synchronizes the host anyway.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

FAULT_ENV = "SAD3_FAULT_INJECT"


def injected_fault(kind: str, step: int) -> bool:
    """Test-only hook: whether $SAD3_FAULT_INJECT asks for fault `kind` at optimizer step `step`
    (1-based, as in metrics.jsonl) on this rank. Format: `KIND:step=S[,S...|A-B]:rank=R|*`, several
    separated by `;`, e.g. `nan_loss:step=3:rank=1` or `sigterm:step=2-3:rank=*`. Kinds:
    nan_loss (the loss becomes NaN), sigterm (the rank sends itself SIGTERM before the step),
    disk_full (the checkpoint of that step does not fit on the disk: engine/checkpoint.py)."""
    spec = os.environ.get(FAULT_ENV, "")
    here = dist.get_rank() if dist.is_initialized() else 0
    for fault in filter(None, spec.split(";")):
        name, *fields = fault.split(":")
        opts = dict(f.split("=", 1) for f in fields)
        steps: set[int] = set()
        for part in opts.get("step", "").split(","):
            lo, _, hi = part.partition("-")
            steps.update(range(int(lo), int(hi or lo) + 1))
        if name == kind and step in steps and opts.get("rank", "*") in ("*", str(here)):
            return True
    return False


def nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if the L2 norm over `tensors` is not finite, else 0.0 (a tensor: no host sync)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return (~torch.isfinite(torch.stack([n.float() for n in norms]).sum())).float()


class StepGuard:
    """One decision per optimizer step, identical on every rank: skip it (non-finite somewhere) and/or
    stop after it (a rank received a stop signal). The trainer resets it before each step and sets
    `loss_flag`; `GuardedAdamW` calls `decide` when the optimizer step runs."""

    def __init__(self, device: torch.device, check_grads: bool, enabled: bool = True):
        self.device, self.check_grads, self.enabled = device, check_grads, enabled
        self.stop_requested = False  # set locally, e.g. by a signal handler
        self.outer = None  # the engine's optimizer when it wraps ours (ZeRO): told about our skips
        self.loss_flag: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.decided, self.skip, self.stop = False, False, False

    def decide(self, grads: list[torch.Tensor]) -> bool:
        """The first call of a step all-reduces [non-finite, stop] over the world; returns skip."""
        if not self.decided:
            flags = torch.zeros(2, device=self.device)
            if self.enabled and self.check_grads:
                flags[0] += nonfinite(grads).to(self.device)
            if self.enabled and self.loss_flag is not None:
                flags[0] += self.loss_flag.to(self.device)
            flags[1] = float(self.stop_requested)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stop = (flags > 0).tolist()
            self.decided, self.skip, self.stop = True, bad, stop
        return self.skip


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that applies a step only when the guard agrees; `overflow` tells DeepSpeed's
    engine the step was skipped (it then counts it and does not advance the LR schedule)."""

    def __init__(self, params, guard: StepGuard, **kwargs):
        super().__init__(params, **kwargs)
        self.guard = guard
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = self.guard.decide(grads)
        if self.overflow:
            outer = self.guard.outer
            if outer is not None and outer is not self:
                outer.overflow = True  # ZeRO copies the untouched partitions back; the engine sees a skip
            return None
        return super().step(closure)
