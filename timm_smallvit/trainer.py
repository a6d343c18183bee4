"""The quick trainer behind ``smallvit train``, in the shape of timm's train.py and built from timm's own parts.

:func:`train` builds the run from a recipe (:mod:`timm_smallvit.recipe`) and coordinates :func:`train_one_epoch` and
:func:`evaluate`, which return the epoch's metrics. From timm: the task and its evaluator (timm.task), the optimizer,
scheduler, EMA, Mixup, losses, CheckpointSaver and update_summary, so checkpoints, ``summary.csv`` and ``args.yaml``
come out as train.py writes them. Added: in-memory data with batched augmentation (:mod:`timm_smallvit.loader`),
torchrun on CPU (gloo) as well as GPUs (NCCL), a progress bar, a clear stop on a non-finite loss, a time budget.
"""

import argparse
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_pretrained, load_state_dict
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler.scheduler import Scheduler
from timm.task import (
    ClassificationTask,
    LogitDistillationTask,
    TrainingTask,
    load_task_ema_checkpoint,
    resume_task_checkpoint,
)
from timm.utils import CheckpointSaver, NativeScaler, init_distributed_device, is_primary
from tqdm import tqdm

from .amp import AutocastFactory, autocast_context, decide_cpu_amp
from .augment import BatchAugment
from .budget import create_scheduler, refit_to_budget, training_compute
from .data import SmallImageDataset
from .loader import BatchLoader, hold_out
from .preprocess import check_data_config
from .recipe import (
    check_resume,
    continue_in_place,
    holds_run,
    resolve_lr,
    run_folder,
    save_epoch,
    write_args,
)
from .smallvit import SmallViT, checkpoint_filter_fn

__all__ = ['NonFiniteLossError', 'evaluate', 'train', 'train_one_epoch']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss became NaN or infinite."""


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` (from :func:`~timm_smallvit.recipe.resolve_args`) says.

    Returns:
        output_dir, eval_metrics (last epoch), best_metric/best_epoch, history (the metrics of each evaluated epoch,
        with cumulative wall time and training TFLOP), model (the evaluated module, EMA if any, unwrapped), data_config,
        args.

    Raises:
        NonFiniteLossError: when the loss stops being finite; checkpoints from earlier epochs are kept.
    """
    device = init_distributed_device(args)  # torchrun: gloo on CPU, NCCL on CUDA
    torch.manual_seed(args.seed + args.rank)
    loss_scaler = NativeScaler() if args.amp and args.amp_dtype == 'float16' else None
    primary = is_primary(args)
    resolve_lr(args)  # before the resume check: a recipe's lr_base gives the lr the checkpoint recorded
    # the dataset is found and checked (folders listed, splits and classes matched) before anything is built
    data = _find_dataset(args)
    resumed_args = check_resume(args) if args.resume else {}

    in_chans = args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)
    model = _create_model(args, in_chans)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = _data_config(args, model)
    output_dir = run_folder(args, data_config['input_size'][-1]) if primary else None  # refused before data or training
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if primary:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f'Model {args.model} created, {n_params:,} parameters, input {data_config["input_size"]}')
    in_shape = tuple(data_config['input_size'])
    decide_cpu_amp(args, model, in_shape, device)  # bf16 only where this run's step runs faster
    amp_autocast = autocast_context(args, device)
    loader_train, loader_eval = _create_loaders(args, data, resumed_args, data_config, in_chans, device)
    task, mixup_fn, optimizer, resume_epoch = _create_task(args, model, loss_scaler, device)

    updates_per_epoch = len(loader_train)
    images_per_epoch = updates_per_epoch * args.batch_size * args.world_size  # every batch full (drop_last)
    planned = {k: getattr(args, k) for k in ('epochs', 'crop_off_epoch', 'mixup_off_epoch')}
    tflop = training_compute(args, model, in_shape, images_per_epoch, planned, teacher=_teacher(task))
    lr_scheduler, num_epochs = create_scheduler(args, optimizer, updates_per_epoch)
    start_epoch = _start_epoch(args, lr_scheduler, num_epochs, updates_per_epoch, resume_epoch)
    refit = bool(args.budget_minutes) and start_epoch == 0  # fit the schedule to budget_minutes as it goes
    max_epochs = args.epochs  # the recipe's, or what budget_tflop allows: a time budget never trains more
    wall_before = float(resumed_args.get('train_wall_s') or 0.0)  # a resumed run adds to the time already trained
    saver = None
    if output_dir is not None:  # the primary process writes the run
        saver = _create_saver(args, task, optimizer, loss_scaler, output_dir, start_epoch)
        _logger.info(f'Output to {output_dir}; {num_epochs} epochs of {updates_per_epoch} steps, lr {args.lr:.3g}')

    eval_metrics: dict[str, float] = {}
    best_metric = best_epoch = None
    history: list[dict[str, float]] = []  # per evaluated epoch, cumulative wall time and TFLOP (accuracy plots)
    t_start = time.perf_counter()
    epoch = start_epoch
    while epoch < num_epochs:  # budget_minutes can change num_epochs as the run goes
        loader_train.set_epoch(epoch)
        t_epoch = time.perf_counter()
        train_metrics = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, lr_scheduler, amp_autocast, loss_scaler, mixup_fn,
            num_epochs=num_epochs, output_dir=output_dir
        )  # fmt: skip
        train_time = time.perf_counter() - t_epoch
        seen = images_per_epoch
        # the compute of every epoch so far, whatever this process resumed from: summary.csv's train_tflop column
        train_metrics['tflop'] = tflop['spent'] + (epoch + 1) * tflop['per_epoch']
        args.train_tflop = round(train_metrics['tflop'], 3)
        args.train_wall_s = round(wall_before + time.perf_counter() - t_start, 1)
        lrs = [group['lr'] for group in optimizer.param_groups]  # the lr the epoch trained at, before any refit
        if refit:  # before the evaluation decision: an epoch that a refit makes the last is evaluated like any last
            elapsed = time.perf_counter() - t_start
            lr_scheduler, num_epochs = refit_to_budget(
                args, planned, max_epochs, optimizer, lr_scheduler, updates_per_epoch, epoch, num_epochs, elapsed,
                output_dir,
            )  # fmt: skip
        metric: float | None = None  # the epoch's eval_metric, None after an epoch that val_interval skips
        # train.py's --val-interval: no evaluation, summary row or checkpoint after the epochs it skips
        evaluated = (epoch + 1) % args.val_interval == 0 or epoch + 1 == num_epochs
        if evaluated:
            # with an EMA only the EMA is evaluated: its metrics are the ones recorded (as in train.py's summary), and
            # a second pass over the test set for the raw weights would cost time for a number nobody sees
            eval_model = task.get_eval_model(ema=task.has_ema())
            assert eval_model is not None
            t_eval = time.perf_counter()
            eval_metrics = evaluate(task, eval_model, loader_eval, args, device, amp_autocast=amp_autocast)
            eval_time = time.perf_counter() - t_eval
            metric = eval_metrics[args.eval_metric]
            if saver is not None and output_dir is not None:
                # timm writes the header when the file is new, so a resumed run appends to its own log
                best_metric, best_epoch = save_epoch(
                    saver, output_dir, epoch, train_metrics, eval_metrics, lr=sum(lrs) / len(lrs), metric=metric
                )
                write_args(output_dir, args)  # the compute and time trained so far, as the checkpoint records them
        if primary:
            _log_epoch(args, epoch, num_epochs, train_metrics, eval_metrics if evaluated else None, train_time, seen)
        if evaluated:
            timing = dict(wall_time=time.perf_counter() - t_start, train_time=train_time, train_images=seen)
            history.append(
                dict(epoch=epoch, **timing, eval_time=eval_time, tflop=train_metrics['tflop'])
                | dict(train_loss=train_metrics['loss'], **eval_metrics)
            )
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metric)  # after a refit, the step it made already: the same lr again
        epoch += 1

    if args.distributed:
        dist.barrier()
    return dict(
        output_dir=output_dir,
        eval_metrics=dict(eval_metrics),
        best_metric=best_metric,
        best_epoch=best_epoch,
        history=history,
        model=timm.utils.unwrap_model(task.get_eval_model(ema=task.has_ema())),
        data_config=data_config,
        args=args,
    )


def train_one_epoch(
    epoch: int,
    task: TrainingTask,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    device: torch.device,
    lr_scheduler: Scheduler | None = None,
    amp_autocast: AutocastFactory = contextlib.nullcontext,
    loss_scaler: NativeScaler | None = None,
    mixup_fn: Mixup | None = None,
    num_epochs: int | None = None,
    output_dir: Path | None = None,
) -> OrderedDict[str, float]:
    """One epoch of training steps (``loader.set_epoch(epoch)`` called), as train.py's: returns the mean loss.

    Args:
        epoch: 0-based; it seeds the epoch (a resumed run repeats it) and switches mixup and cropping off.
        lr_scheduler: Stepped per update here (``sched_on_updates``), per epoch by the caller.
        num_epochs, output_dir: For the progress bar, and the message of a non-finite loss (NonFiniteLossError).
    """
    torch.manual_seed(args.seed + args.rank + 7919 * epoch)  # dropout etc.: a resumed run repeats this epoch
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    if loader.augment is not None and args.crop_off_epoch and epoch >= args.crop_off_epoch:
        loader.augment.scale = None  # whole images from here on; flip, jitter and erasing as before
    trainable = _trainable(task)
    trainable.train()
    updates_per_epoch = len(loader)
    num_updates = epoch * updates_per_epoch
    primary = is_primary(args)
    loss_sum, loss_count, seen, t_epoch = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(
        loader,
        total=updates_per_epoch,
        desc=f'epoch {epoch + 1}/{num_epochs or args.epochs}',
        disable=not primary,
        mininterval=2.0,
        leave=False,
        dynamic_ncols=True,
    )
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        with amp_autocast():
            loss = task(x, y)['loss']
        if not _all_finite(loss, args):
            raise NonFiniteLossError(_non_finite_message(loss, epoch, step, output_dir))
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode)
        else:
            loss.backward()
            if args.clip_grad is not None:
                timm.utils.dispatch_clip_grad(task.get_clip_parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.item() * x.shape[0]
        loss_count += x.shape[0]
        seen += x.shape[0] * args.world_size
        if primary and (step % args.log_interval == 0 or step == updates_per_epoch - 1):
            rate = seen / (time.perf_counter() - t_epoch)
            bar.set_postfix(
                loss=f'{loss_sum / loss_count:.4f}',
                lr=f'{optimizer.param_groups[0]["lr"]:.2e}',
                img_s=f'{rate:.0f}',
            )
    bar.close()
    train_loss = torch.tensor([loss_sum / max(loss_count, 1)], device=device)
    if args.distributed:
        dist.all_reduce(train_loss)
        train_loss /= args.world_size
    return OrderedDict(loss=train_loss.item())


def evaluate(
    task: TrainingTask,
    model: torch.nn.Module,
    loader: BatchLoader,
    args: argparse.Namespace,
    device: torch.device,
    amp_autocast: AutocastFactory = contextlib.nullcontext,
) -> OrderedDict[str, float]:
    """The task's metrics of ``model`` on ``loader``, over every process, as train.py's ``validate``.

    Returns:
        loss, top1, top5 (the task's evaluator); with ``args.eval_hflip`` those of the mean of each image's and its
        mirror's logits, and the single-view ones as loss_single, top1_single, top5_single.
    """
    evaluator = task.create_evaluator()
    single = task.create_evaluator() if args.eval_hflip else None
    model.eval()
    with torch.inference_mode():
        for x, y in loader:
            if not len(x):  # the last global batch can leave a process nothing
                continue
            x, y = x.to(device), y.to(device)
            with amp_autocast():
                output = model(x).float()
                if single is not None:
                    single.update(output, y)
                    output = (output + model(x.flip(-1)).float()) / 2
            evaluator.update(output, y)
    metrics = evaluator.compute(distributed=args.distributed)
    if single is not None:
        metrics.update((f'{k}_single', v) for k, v in single.compute(distributed=args.distributed).items())
    return metrics


def _log_epoch(
    args: argparse.Namespace,
    epoch: int,
    num_epochs: int,
    train_metrics: dict[str, float],
    eval_metrics: dict[str, float] | None,
    train_time: float,
    seen: int,
) -> None:
    tflop, loss = train_metrics['tflop'], train_metrics['loss']
    line = f'epoch {epoch + 1}/{num_epochs}  {tflop:.1f} TFLOP  train loss {loss:.4f}  '
    if eval_metrics is None:
        line += f'(not evaluated: val_interval {args.val_interval})  '
    else:
        loss, top1, top5 = eval_metrics['loss'], eval_metrics['top1'], eval_metrics['top5']
        line += f'eval loss {loss:.4f}  top-1 {top1:.2f}  top-5 {top5:.2f}  '
        if args.eval_hflip:
            line += f'(single view {eval_metrics["top1_single"]:.2f})  '
    _logger.info(line + f'({train_time:.0f}s, {seen / train_time:.0f} img/s)')


def _find_dataset(args: argparse.Namespace) -> SmallImageDataset:
    data = SmallImageDataset(
        args.dataset,
        args.data_dir,
        train_split=args.train_split,
        val_split=args.val_split,
        class_map=args.class_map,
        download=args.dataset_download,
    )
    if args.num_classes is None:
        args.num_classes = len(data.classes or ())
    return data


def _data_config(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    built_for = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if args.img_size is None and args.input_size is None and built_for:
        # timm's pretrained_cfg keeps the size the weights were made at; model_kwargs img_size builds another
        data_config['input_size'] = (data_config['input_size'][0], *built_for)
    # what the recipe leaves unset comes from the model's pretrained_cfg (an hf-hub: export): checked as readers do
    return check_data_config(data_config, source=f'{args.model} (its pretrained_cfg) with the recipe')


def _create_loaders(
    args: argparse.Namespace,
    data: SmallImageDataset,
    resumed_args: dict[str, Any],
    data_config: dict[str, Any],
    in_chans: int,
    device: torch.device,
) -> tuple[BatchLoader, BatchLoader]:
    """The training and evaluation batches, the images decoded into memory; the classes checked against the run."""
    img_size = tuple(data_config['input_size'][1:])
    data.check_memory(in_chans, img_size)
    decode = dict(
        in_chans=in_chans,
        img_size=img_size,
        input_img_mode=args.input_img_mode,
        interpolation=data_config['interpolation'],
        progress=is_primary(args),
    )
    train_split = data.load('train', **decode)
    train_x, train_y = train_split.images, train_split.labels
    if args.val_holdout:
        train_x, train_y, eval_x, eval_y = hold_out(train_x, train_y, args.val_holdout, data.name)
    else:  # the validation split is not even read with a holdout: nothing of it can inform the run
        eval_split = data.load('val', **decode)
        eval_x, eval_y = eval_split.images, eval_split.labels
    args.label_names = list(train_split.classes)  # export writes them as config.json label_names
    if resumed_args.get('label_names') not in (None, args.label_names):
        raise ValueError(
            f'resume {args.resume}: the checkpoint was trained on the classes {resumed_args["label_names"]}, but '
            f'{data.name} now has {args.label_names}. Resume on the data it was trained on, or start a new run from '
            f'its weights with initial_checkpoint: {args.resume}.'
        )
    if args.train_num_samples:
        train_x, train_y = train_x[: args.train_num_samples], train_y[: args.train_num_samples]
    if args.val_num_samples:
        eval_x, eval_y = eval_x[: args.val_num_samples], eval_y[: args.val_num_samples]
    if args.num_classes != len(train_split.classes):
        shown = ', '.join(train_split.classes[:5]) + (', ...' if len(train_split.classes) > 5 else '')
        raise ValueError(
            f'num_classes {args.num_classes}: {data.name} has {len(train_split.classes)} classes ({shown}). '
            f'Set num_classes: {len(train_split.classes)}, or leave it unset.'
        )
    augment = None
    if not args.no_aug:
        augment = BatchAugment(
            img_size,
            scale=args.scale,
            ratio=args.ratio,
            hflip=args.hflip,
            color_jitter=args.color_jitter,
            interpolation=data_config['interpolation'],
        )
    erase = None
    if not args.no_aug and args.reprob > 0:
        erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device)
    common = dict(
        mean=data_config['mean'],
        std=data_config['std'],
        img_size=img_size,
        rank=args.rank,
        world_size=args.world_size,
        interpolation=data_config['interpolation'],
        channels_last=args.channels_last,
        device=device,  # batches are built and augmented where the model runs
    )
    loader_train = BatchLoader(
        train_x,
        train_y,
        args.batch_size,
        augment=augment,
        erase=erase,
        shuffle=True,
        drop_last=True,
        seed=args.seed,
        alternate_flips=args.alternate_flips,
        **common,
    )
    loader_eval = BatchLoader(eval_x, eval_y, args.validation_batch_size or args.batch_size, **common)
    if len(loader_train) == 0:
        raise ValueError(
            f'{len(train_x)} training images make no full batch of {args.batch_size} x {args.world_size} process(es): '
            'lower batch_size or raise train_num_samples.'
        )
    return loader_train, loader_eval


def _create_task(
    args: argparse.Namespace, model: torch.nn.Module, loss_scaler: NativeScaler | None, device: torch.device
) -> tuple[TrainingTask, Mixup | None, torch.optim.Optimizer, int | None]:
    """The training task (the model, its loss, a teacher to distill from, the EMA), compiled and wrapped for torchrun.

    Returns:
        The task, the batches' mixup/cutmix (or None), the optimizer, and the epoch a resumed run continues at.
    """
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=args.num_classes,
        )
        train_loss_fn: torch.nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = torch.nn.CrossEntropyLoss()
    if args.kd_model_name:
        task: TrainingTask = LogitDistillationTask(
            student_model=model,
            teacher_model=args.kd_model_name,
            criterion=train_loss_fn,
            loss_type=args.kd_loss_type,
            distill_loss_weight=args.distill_loss_weight,
            task_loss_weight=args.task_loss_weight,
            temperature=args.kd_temperature,
            device=device,
            verbose=is_primary(args),
        )
    else:
        task = ClassificationTask(model, criterion=train_loss_fn, device=device, verbose=is_primary(args))

    optimizer = create_optimizer_v2(_trainable(task), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    resume_epoch = None
    if args.resume:
        try:
            resume_epoch = resume_task_checkpoint(
                task,
                args.resume,
                optimizer=None if args.no_resume_opt else optimizer,
                loss_scaler=None if args.no_resume_opt else loss_scaler,
                log_info=is_primary(args),
            )
        except (RuntimeError, ValueError, KeyError) as e:  # weights of another shape, an optimizer of another kind
            first = str(e).strip().splitlines()[0]
            raise ValueError(
                f'resume {args.resume}: its state does not fit {args.model} as configured ({first}).'
            ) from e
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None)
    return task, mixup_fn, optimizer, resume_epoch


def _start_epoch(
    args: argparse.Namespace,
    lr_scheduler: Scheduler | None,
    num_epochs: int,
    updates_per_epoch: int,
    resume_epoch: int | None,
) -> int:
    """The first epoch to train (0, or where a resumed run left off), with the schedule moved there."""
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if args.resume and start_epoch >= num_epochs:
        raise ValueError(
            f'resume {args.resume}: the checkpoint ends epoch {start_epoch - 1}, and epochs is {args.epochs}: nothing '
            f'is left to train. Raise epochs to continue the run.'
        )
    if args.budget_minutes and start_epoch != 0 and is_primary(args):
        _logger.warning(
            f'budget_minutes {args.budget_minutes}: a resumed run keeps the epochs it was given ({args.epochs}); '
            "set epochs (and crop_off_epoch) to the fitted values in the first run's args.yaml to resume it as fitted."
        )
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    return start_epoch


def _create_saver(
    args: argparse.Namespace,
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    loss_scaler: NativeScaler | None,
    output_dir: Path,
    start_epoch: int,
) -> CheckpointSaver:
    """timm's checkpoint saver for the run folder (created now), and the run's args.yaml written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(
        model=task.get_trainable_module(),
        optimizer=optimizer,
        args=args,
        amp_scaler=loss_scaler,
        checkpoint_dir=str(output_dir),
        recovery_dir=str(output_dir),
        decreasing=args.eval_metric == 'loss',
        max_history=args.checkpoint_hist,
        task=task,
    )
    if args.resume and output_dir.resolve() == Path(args.resume).resolve().parent:
        continue_in_place(output_dir, saver, Path(args.resume), start_epoch)
    write_args(output_dir, args)
    return saver


# ----------------------------------------------------------------------------------------------------------------
# the model, the run folder, the checks of each step


def _create_model(args: argparse.Namespace, in_chans: int) -> Any:  # a timm model: pretrained_cfg, num_classes, ...
    """The model as train.py creates it, starting from trained weights where the recipe says so.

    ``pretrained`` (a model name with pretrained weights, ``hf-hub:``/``local-dir:``, or ``pretrained_path``) and
    ``initial_checkpoint`` load through timm's pretrained path: another num_classes resets the classifier, another
    img_size resamples the position embedding, another in_chans adapts the input conv. A resumed run skips them: the
    checkpoint brings its own weights.
    """
    factory_kwargs: dict[str, Any] = {}
    if args.pretrained_path:  # train.py's: these weights as the pretrained ones, head always reset
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    pretrained = bool(args.pretrained) and not args.resume
    if pretrained and args.pretrained_path and not Path(args.pretrained_path).is_file():
        raise FileNotFoundError(f'pretrained_path {args.pretrained_path}: no such file.')
    try:
        model = timm.create_model(
            args.model,
            pretrained=pretrained,
            in_chans=in_chans,
            num_classes=args.num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path,
            global_pool=args.gp,
            **factory_kwargs,
            **args.model_kwargs,
        )
    except RuntimeError as e:
        if 'No pretrained weights' not in str(e):
            raise
        named = ', '.join(timm.list_pretrained('smallvit*'))
        raise ValueError(
            f'pretrained: true, but {args.model} has no pretrained weights. Models with weights: {named}; or start '
            'from your own with initial_checkpoint, model: local-dir:<folder> or hf-hub:<repo>.'
        ) from None
    starts_random = not (pretrained or args.resume or args.initial_checkpoint)
    if args.model.startswith(('hf-hub:', 'local-dir:')) and starts_random:
        _logger.warning(
            f'{args.model}: training from random weights, as train.py does without --pretrained. Set pretrained: true '
            'to start from its weights.'
        )
    if args.initial_checkpoint and not args.resume:
        _load_initial_checkpoint(model, Path(args.initial_checkpoint))
    return model


def _load_initial_checkpoint(model: Any, path: Path) -> None:
    # train.py loads initial_checkpoint strictly; here it goes through timm's pretrained path, which loads the same
    # weights when they fit and adapts (as for pretrained weights) when num_classes, img_size or in_chans differ
    if not path.is_file():
        raise FileNotFoundError(f'initial_checkpoint {path}: no such file.')
    try:
        state_dict = load_state_dict(str(path))  # timm's: safetensors, state dicts and train.py checkpoints
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'initial_checkpoint {path}: not a readable checkpoint ({first}).') from e
    # the weights read here go to timm as they are (no second read), whatever source the model's own cfg names
    cfg = dict(model.pretrained_cfg, source='', state_dict=state_dict)
    head = state_dict.get('head.weight')
    cfg['num_classes'] = head.shape[0] if head is not None else model.num_classes
    first_conv = cfg.get('first_conv') or 'patch_embed.proj'
    conv = state_dict.get(f'{first_conv}.weight')
    if conv is not None:
        cfg['input_size'] = (conv.shape[1], *(cfg.get('input_size') or (0, 0, 0))[1:])
    try:
        load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=model.in_chans, filter_fn=_filter(model))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f'initial_checkpoint {path}: its weights do not fit {type(model).__name__} ({first}).') from e


def _teacher(task: TrainingTask) -> torch.nn.Module | None:
    teacher = getattr(task, 'teacher', None)  # timm's DistillationTeacher, under LogitDistillationTask
    return timm.utils.unwrap_model(teacher.model) if teacher is not None else None


def _trainable(task: TrainingTask) -> torch.nn.Module:
    module = task.get_trainable_module()
    assert module is not None, 'a classification task always has a trainable model'
    return module


def _filter(model: torch.nn.Module) -> Callable | None:
    # smallvit's filter (position / patch embedding resampling); other timm models get their own from timm
    return checkpoint_filter_fn if isinstance(model, SmallViT) else None


def _all_finite(loss: torch.Tensor, args: argparse.Namespace) -> bool:
    finite = torch.isfinite(loss.detach()).float()
    if args.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together, none waits on a collective
    return bool(finite.item())


def _non_finite_message(loss: torch.Tensor, epoch: int, step: int, output_dir: Path | None) -> str:
    message = f'Loss is {loss.item()} at epoch {epoch} step {step}: training stopped. '
    last = output_dir / 'last.pth.tar' if output_dir is not None else None
    if last is not None and last.is_file():
        return message + (
            f'The last good checkpoint is {last}: resume from it with no_resume_opt: true and a lower lr (or with '
            'clip_grad), or restart with a lower lr or more warmup_epochs.'
        )
    if output_dir is not None and not holds_run(output_dir):
        # nothing worth keeping (args.yaml only): the same command, with a lower lr, can start the run again
        (output_dir / 'args.yaml').unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            output_dir.rmdir()
    return message + (
        'No checkpoint was written (nothing kept): run the same command again with a lower lr, more warmup_epochs '
        'or clip_grad.'
    )
