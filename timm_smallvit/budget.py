"""How long a run trains: its schedule fitted to a compute budget (``budget_tflop``) or a time budget
(``budget_minutes``), with the recipe's epoch switches scaled to it.

    training_compute  FLOPs per training image and per epoch, counted; the epochs cut to budget_tflop
    fit_to_tflop      the epochs whose training compute stays within budget_tflop, decided before the first step
    fit_to_budget     the epochs that fit budget_minutes at the pace of the epochs so far
    refit_to_budget   after an epoch: the schedule rebuilt to what fits budget_minutes (timm's scheduler)
    set_epochs        a schedule of N epochs, crop_off_epoch and mixup_off_epoch scaled with it

Compute is counted in FLOPs per training image (:mod:`timm_smallvit.flops`) times the images trained on, so a
``budget_tflop`` run trains the same epochs on any machine; ``budget_minutes`` depends on the machine's pace.
"""

import argparse
import contextlib
import logging
import math
import platform
from pathlib import Path

import torch
import torch.distributed as dist
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.scheduler.scheduler import Scheduler
from timm.utils import is_primary

from .flops import training_flops_per_image
from .recipe import write_args

__all__ = [
    'create_scheduler',
    'device_name',
    'fit_to_budget',
    'fit_to_tflop',
    'refit_to_budget',
    'set_epochs',
    'training_compute',
]

_logger = logging.getLogger(__name__)

# The fitted schedule assumes each epoch takes this much longer than the mean so far: a VM's pace drifts within a
# run, and the epochs after the last refit are not measured.
_BUDGET_MARGIN = 1.03


def fit_to_tflop(args: argparse.Namespace, tflop_per_epoch: float, spent_tflop: float = 0.0) -> int:
    """The most epochs (never more than ``args.epochs``) whose compute, with ``spent_tflop``, is within budget_tflop.

    Args:
        args: The run's args, with ``budget_tflop`` set.
        tflop_per_epoch: One epoch's training compute (FLOPs per training image x images per epoch / 1e12).
        spent_tflop: Compute spent before the run that counts towards the budget (a distillation teacher's training).
    """
    left = args.budget_tflop - spent_tflop
    epochs = math.floor(left / tflop_per_epoch * (1 + 1e-9))  # a budget of exactly N epochs is N, not N - 1
    if epochs < 1:
        before = f' after the {spent_tflop:g} TFLOP spent before the run (kd_teacher_tflop)' if spent_tflop else ''
        raise ValueError(
            f'budget_tflop {args.budget_tflop:g}: one epoch of {args.model} costs {tflop_per_epoch:.2f} TFLOP, and '
            f'{max(left, 0):.2f} TFLOP are left{before}. Raise budget_tflop, or train on fewer images per epoch.'
        )
    return min(epochs, args.epochs)


def fit_to_budget(args: argparse.Namespace, epochs_done: int, elapsed_s: float) -> int:
    """The schedule's length in epochs that ends within ``args.budget_minutes``, at the pace of the epochs so far."""
    left = args.budget_minutes * 60 - elapsed_s
    # the mean epoch so far, not the last one: a single epoch's pace can be far from the run's
    fitted = epochs_done + max(0, math.floor(left / (elapsed_s / epochs_done * _BUDGET_MARGIN)))
    if args.distributed:  # every process must run the same schedule: the primary's measurement decides
        fitted_t = torch.tensor([fitted], dtype=torch.int64, device=args.device)
        dist.broadcast(fitted_t, src=0)
        fitted = int(fitted_t.item())
    return fitted


def set_epochs(args: argparse.Namespace, planned: dict[str, int], epochs: int) -> None:
    """Give ``args`` a schedule of ``epochs``, with the recipe's (``planned``) epoch switches scaled to it."""
    args.epochs = epochs
    for key in ('crop_off_epoch', 'mixup_off_epoch'):  # from the recipe's values: no compound rounding
        if planned[key]:
            setattr(args, key, round(planned[key] * epochs / planned['epochs']))


def create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler for ``args`` and the number of epochs it runs (cooldown included)."""
    return create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch,
    )


def refit_to_budget(
    args: argparse.Namespace,
    planned: dict[str, int],
    max_epochs: int,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Scheduler | None,
    updates_per_epoch: int,
    epoch: int,
    num_epochs: int,
    elapsed: float,
    output_dir: Path | None,
) -> tuple[Scheduler | None, int]:
    """The schedule (and its epochs) that fits ``args.budget_minutes``, after ``epoch`` trains, before its evaluation.

    The pace is the mean epoch so far, with the evaluations before this epoch's. A new schedule changes ``args`` (epochs
    and the epoch switches, scaled from the recipe's ``planned`` values) and the run's args.yaml; it never has more
    than ``max_epochs`` (the recipe's, or what budget_tflop allows).
    """
    # After each epoch from the second, the pace so far says how many epochs fit the budget. Refits stop before
    # the last fifth and before crop/mixup switch off: late in a cosine a change of length would jolt the low lr.
    switches = [args.crop_off_epoch or num_epochs, args.mixup_off_epoch or num_epochs]
    if not (epoch >= 1 and epoch + 1 < min(0.8 * num_epochs, *switches)):
        return lr_scheduler, num_epochs
    extra = num_epochs - args.epochs  # cooldown epochs the scheduler factory added
    fitted = min(fit_to_budget(args, epoch + 1, elapsed), max_epochs + extra)
    if fitted == num_epochs:
        return lr_scheduler, num_epochs
    before = num_epochs
    set_epochs(args, planned, max(fitted - extra, 1))
    # the optimizer keeps its initial_lr, so the new schedule starts from the same base (no metric: a budget refuses
    # the plateau schedule, the one schedule that reads it)
    lr_scheduler, num_epochs = create_scheduler(args, optimizer, updates_per_epoch)
    lr_scheduler.step(epoch + 1)
    lr_scheduler.step_update(num_updates=(epoch + 1) * updates_per_epoch)
    if output_dir is not None:  # the primary process
        write_args(output_dir, args)  # a resume continues the fitted schedule
        _logger.info(
            f'budget_minutes {args.budget_minutes}: {epoch + 1} epochs in {elapsed:.0f} s, '
            f'{num_epochs} epochs in all instead of {before}'
            + (f' (crop_off_epoch {args.crop_off_epoch})' if args.crop_off_epoch else '')
        )
    return lr_scheduler, num_epochs


def training_compute(
    args: argparse.Namespace,
    model: torch.nn.Module,
    in_shape: tuple[int, ...],
    images_per_epoch: int,
    planned: dict[str, int],
    teacher: torch.nn.Module | None = None,
) -> dict[str, float]:
    """The compute of an epoch and before the run (TFLOP), recorded in args; the epochs cut to budget_tflop.

    Returns ``per_epoch`` and ``spent`` (before the first step), in TFLOP. Sets ``args.train_gflop_per_image`` and
    ``args.train_device`` (args.yaml records them) and, with ``budget_tflop``, the epochs that fit it.

    FLOPs per image are counted on the step as it runs: the model's forward and backward and a distillation
    ``teacher``'s forward (:func:`~timm_smallvit.flops.training_flops_per_image`). A teacher's own training
    (``kd_teacher_tflop``) counts as spent before the first step.
    """
    flops = training_flops_per_image(model, in_shape, args.num_classes, teacher=teacher)
    per_epoch = flops * images_per_epoch / 1e12
    spent = float(args.kd_teacher_tflop or 0)
    args.train_gflop_per_image = flops / 1e9
    args.train_device = device_name(torch.device(args.device))
    if args.budget_tflop:
        epochs = fit_to_tflop(args, per_epoch, spent)
        if epochs != args.epochs:
            set_epochs(args, planned, epochs)
        if is_primary(args):
            _logger.info(
                f'budget_tflop {args.budget_tflop:g}: {flops / 1e9:.4f} GFLOP per image, {per_epoch:.2f} TFLOP per '
                f'epoch, {epochs} epochs ({spent + epochs * per_epoch:.1f} TFLOP'
                + (f', {spent:g} of them before the run' if spent else '')
                + ')'
                + (f' instead of {planned["epochs"]}' if epochs != planned['epochs'] else '')
            )
    return dict(per_epoch=per_epoch, spent=spent)


def device_name(device: torch.device) -> str:
    """What trained: the GPU's name, or the CPU's model name and the threads torch used (for the card)."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA)'
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                name = line.partition(':')[2].strip()
                break
    threads = torch.get_num_threads()
    return f'{name}, {threads} thread{"s" if threads != 1 else ""} (CPU)'
