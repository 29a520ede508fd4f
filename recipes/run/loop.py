"""The training loop: data loaders (length-bucketed on CPU), one epoch, the learning-rate schedule,
what each stage freezes, and the check that training has not diverged."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adaptive_depth.losses import LossTerms
from recipes.run.distributed import is_main_process
from recipes.run.errors import TrainingDivergedError
from recipes.run.logs import logger

__all__ = ["EpochStats", "bucketed_batches", "check_finite", "divergence_hint", "freeze_for_stage2", "frozen", "linear_schedule",
           "make_loader", "run_epoch", "stage2_train_mode"]


def make_loader(
    dataset: Dataset, batch_size: int, collate_fn: Callable[[list[Any]], Any], shuffle: bool, seed: int, epoch: int = 0,
    lengths: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader padding per batch.

    With a process group: a seeded ``DistributedSampler``. Otherwise, when ``shuffle`` and
    ``lengths`` (tokens per example) are given, length-bucketed batches
    (:func:`bucketed_batches`), which cut padding on CPU; else plain seeded shuffling.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    if shuffle and lengths is not None:
        batches = bucketed_batches(lengths, batch_size, seed + epoch)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn)


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, bucket_batches: int = 50) -> list[list[int]]:
    """Shuffled batches of indices of similar length (less padding with per-batch padding).

    Indices are shuffled, cut into buckets of ``bucket_batches * batch_size``, sorted by length
    inside each bucket and cut into batches; the batches are then shuffled. Every index
    appears exactly once.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), size):
        bucket = sorted(order[start:start + size], key=lambda index: lengths[index])
        batches += [bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclasses.dataclass
class EpochStats:
    """Summary of one training epoch.

    Attributes:
        loss: mean loss per batch.
        samples: samples seen by this process.
        seconds: wall time.
        terms: mean per batch of each named loss term (:class:`~adaptive_depth.losses.LossTerms`).
    """

    loss: float
    samples: int
    seconds: float
    terms: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def run_epoch(
    loader: Iterable[Mapping[str, Tensor]],
    step: Callable[[Mapping[str, Tensor]], LossTerms],
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[nn.Parameter],
    description: str,
    scheduler: Any = None,
    max_grad_norm: float = 1.0,
    divergence_hint: str = "lower the learning rate",
) -> EpochStats:
    """Train for one pass over ``loader``.

    Args:
        loader: batches (dicts with ``labels``).
        step: computes the loss terms of a batch (the forward pass); their total is minimized.
        optimizer: steps after every batch.
        parameters: the trained parameters, for gradient clipping.
        description: progress-bar and log prefix (``"stage 1 epoch 2/3"``).
        scheduler: optional learning-rate scheduler stepped after every batch.
        max_grad_norm: clip the global gradient norm (``<= 0``: no clipping).
        divergence_hint: how to fix a non-finite loss, for the error message.

    Raises:
        TrainingDivergedError: the loss of a batch is NaN or infinite.
    """
    from tqdm.auto import tqdm

    total_loss, batches, samples = 0.0, 0, 0
    term_sums: dict[str, float] = {}
    start = time.perf_counter()
    # Redirected to a file, a bar refreshed 10 times a second buries the log lines: refresh
    # it once a minute there instead.
    interval = 0.1 if sys.stderr.isatty() else 60.0
    bar = tqdm(loader, desc=description, disable=not is_main_process(), leave=False, dynamic_ncols=True,
               mininterval=interval)
    try:
        for batch in bar:
            terms = step(batch)
            loss = terms.total
            if not torch.isfinite(loss):
                shown = ", ".join(f"{name} {value:.4g}" for name, value in terms.scalars().items())
                raise TrainingDivergedError(
                    f"{description}: the loss is {loss.item()} at batch {batches + 1} ({shown}): training diverged; "
                    f"{divergence_hint}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += float(loss.detach())
            for name, value in terms.terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + float(value.detach())
            batches += 1
            samples += int(batch["labels"].shape[0])
            elapsed = time.perf_counter() - start
            # refresh=False: the postfix shows at the bar's next timed refresh; set_postfix's default
            # refresh=True would redraw on every batch, whatever mininterval says.
            shown_terms = {name: f"{value / batches:.4f}" for name, value in term_sums.items()} if len(term_sums) > 1 else {}
            bar.set_postfix(loss=f"{total_loss / batches:.4f}", **shown_terms,
                            samples_s=f"{samples / max(elapsed, 1e-9):.1f}", refresh=False)
    finally:
        bar.close()  # an interrupted epoch must not leave the bar on the line the next message goes to
    stats = EpochStats(loss=total_loss / max(batches, 1), samples=samples, seconds=time.perf_counter() - start,
                       terms={name: value / max(batches, 1) for name, value in term_sums.items()})
    if is_main_process():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in stats.terms.items())
        logger.info(
            "%s: loss %.4f (%s), %d samples in %.1f s (%.1f samples/s)",
            description, stats.loss, shown, stats.samples, stats.seconds, stats.samples_per_second,
        )
    return stats


@contextlib.contextmanager
def frozen(parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Inside the block ``parameters`` get no gradient (``requires_grad=False``), so an optimizer
    step leaves them exactly as they are (AdamW skips a parameter without a gradient, weight decay
    included); their previous ``requires_grad`` is restored after it, also on error."""
    previous = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, previous):
            parameter.requires_grad_(flag)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then linear decay to 0."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_for_stage2(model: nn.Module, modules: list[nn.Module]) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` but those of ``modules``; returns the trainable ones."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
            trainable.append(parameter)
    return trainable


def stage2_train_mode(model: nn.Module, modules: list[nn.Module]) -> None:
    """Eval mode (no dropout) for the frozen parts, train mode for ``modules``."""
    model.eval()
    for module in modules:
        module.train()


def divergence_hint(config: Any, stage: int) -> str:
    """How to fix a diverged ``stage`` (1 or 2): the learning rates of ``config`` to lower, with their values."""
    if stage == 2:
        return f"lower stage2_lr (now {config.stage2_lr:g}), e.g. stage2_lr={config.stage2_lr / 4:g}"
    extra = [f"{key} (now {getattr(config, key):g})" for key in ("stage1_head_lr", "gate_lr")
             if getattr(config, key, 0)]
    return (f"lower stage1_lr (now {config.stage1_lr:g}), e.g. stage1_lr={config.stage1_lr / 4:g}"
            + (f", or {' / '.join(extra)}" if extra else ""))


def check_finite(parameters: Sequence[nn.Parameter], when: str, hint: str, checkpoint_dir: Any) -> None:
    """:class:`~recipes.run.errors.TrainingDivergedError` when a trained parameter holds NaN or
    infinity (``when``: ``"stage 1 epoch 2"``; ``hint``: which learning rate to lower)."""
    bad = sum(1 for parameter in parameters if not bool(torch.isfinite(parameter.detach()).all()))
    if bad:
        raise TrainingDivergedError(
            f"after {when}, {bad} of {len(parameters)} trained parameter tensors hold NaN or infinity: training "
            f"diverged; {hint} (the last good checkpoint, if any, is in {checkpoint_dir}, but it would diverge the "
            "same way: start again with --overwrite)"
        )
