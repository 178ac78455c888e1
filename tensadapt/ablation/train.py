"""The training loop of one run: AdamW, warmup then cosine / linear / constant, then accuracy.

The same code serves one process and a ``torchrun`` group: each process computes its shard
of the global batch with loss ``sum(CE) · world / global_batch``, so after DDP averages the
gradients every process holds the gradient of the mean loss over the *whole* batch — the
single-process gradient. The test set is split the same way and correct counts are summed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistContext
from .spec import Recipe
from .tasks import TaskData, batch_inputs, logits_of

__all__ = ["FitResult", "lr_factor", "fit", "evaluate", "steps_per_epoch"]


@dataclass
class FitResult:
    """What training measured."""

    steps: int
    step_times: list[float] = field(default_factory=list)
    train_loss: float = float("nan")

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


def lr_factor(step: int, total: int, warmup: float, scheduler: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``."""
    warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
    if warm and step < warm:
        return (step + 1) / warm
    if scheduler == "constant":
        return 1.0
    span = max(1, total - warm)
    progress = min(1.0, (step - warm) / span)
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Optimizer steps per epoch (a last batch smaller than the world size is dropped)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world else 0)


def _batches(n: int, batch_size: int, world: int, generator: torch.Generator) -> Iterable:
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) >= world:
            yield idx


def fit(
    model: nn.Module,
    param_groups: list[dict],
    data: TaskData,
    recipe: Recipe,
    seed: int,
    ctx: DistContext,
    *,
    progress: Callable[[int], object] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> FitResult:
    """Train ``model`` (the trainable parameters in ``param_groups``) on ``data.train``.

    ``progress(total_steps)`` returns a tqdm-like bar (``update``, ``set_postfix``,
    ``close``); ``on_step(step, model)`` is called after each backward pass, before the
    optimizer step (tests read gradients there).
    """
    net: nn.Module = model
    if ctx.active:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups, weight_decay=recipe.weight_decay)
    total = recipe.epochs * steps_per_epoch(data.n_train, recipe.batch_size, ctx.world)
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, recipe.warmup, recipe.scheduler)
    )
    trainable = [p for g in param_groups for p in g["params"]]
    bar = progress(total) if progress else None
    result = FitResult(steps=0)
    loss_sum, loss_n = 0.0, 0
    model.train()
    for epoch in range(recipe.epochs):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for idx in _batches(data.n_train, recipe.batch_size, ctx.world, g):
            if result.steps >= total:
                break
            t0 = time.perf_counter()
            local = idx[ctx.rank :: ctx.world]
            inputs = batch_inputs(data.train, local)
            logits = logits_of(net(**inputs))
            ce = F.cross_entropy(logits, data.y_train[local], reduction="sum")
            loss = ce * (ctx.world / len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if on_step is not None:
                on_step(result.steps, model)
            if recipe.grad_clip is not None:
                nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
            opt.step()
            sched.step()
            result.step_times.append(time.perf_counter() - t0)
            result.steps += 1
            loss_sum += float(ce.detach())
            loss_n += len(local)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(ce) / max(1, len(local)):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    loss_sum, loss_n = ctx.all_reduce([loss_sum, float(loss_n)])
    result.train_loss = loss_sum / loss_n if loss_n else float("nan")
    model.eval()
    return result


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: TaskData,
    recipe: Recipe,
    ctx: DistContext,
    *,
    progress: Callable[[int], object] | None = None,
) -> tuple[int, int]:
    """``(correct, total)`` on the test split, summed over every process."""
    model.eval()
    index = torch.arange(data.n_test)[ctx.rank :: ctx.world]
    chunks = list(index.split(recipe.eval_batch_size))
    bar = progress(len(chunks)) if progress else None
    correct = 0
    for idx in chunks:
        logits = logits_of(model(**batch_inputs(data.test, idx)))
        correct += int((logits.argmax(-1) == data.y_test[idx]).sum())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    correct_f, total_f = ctx.all_reduce([float(correct), float(len(index))])
    return int(correct_f), int(total_f)
