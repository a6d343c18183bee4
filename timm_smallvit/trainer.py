"""The quick trainer behind ``smallvit train``: timm's train.py recipe format, built from timm's own parts.

It is for a CPU or a few GPUs and small in-memory datasets (an image folder, torch/mnist, torch/fashion_mnist,
torch/cifar10, ...: :class:`~timm_smallvit.data.SmallImageDataset`). Recipes are YAML files with
train.py's argument names, so the same file drives ``train.py --config``. The trainer honours the keys listed in
:data:`TRAIN_PY_DEFAULTS` (with train.py's defaults) and the few of its own in :data:`QUICK_TRAINER_KEYS` (which
train.py does not know: ``smallvit train-py`` warns that they go unused there), and refuses any other key by name
rather than ignore it.

Pieces from timm: ClassificationTask / LogitDistillationTask and their evaluator (timm.task), create_optimizer_v2,
create_scheduler_v2, ModelEmaV3 (through the task), Mixup, the loss classes, CheckpointSaver and update_summary, so
checkpoints, ``summary.csv`` and ``args.yaml`` come out as train.py writes them and ``smallvit export`` takes both.
What it adds: data held in memory as uint8 tensors with augmentation on whole batches (:mod:`timm_smallvit.data`),
torchrun on CPU (gloo) as well as GPUs (NCCL), a progress bar, a clear stop on a non-finite loss.
"""

import argparse
import contextlib
import csv
import functools
import logging
import math
import os
import platform
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_pretrained, load_state_dict, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationTask,
    LogitDistillationTask,
    TrainingTask,
    load_task_ema_checkpoint,
    resume_task_checkpoint,
)
from timm.utils import (
    CheckpointSaver,
    NativeScaler,
    init_distributed_device,
    is_primary,
    load_checkpoint_metadata,
    update_summary,
)
from tqdm import tqdm

from .augment import BatchAugment
from .data import TORCH_DATASETS, SmallImageDataset
from .loader import BatchLoader
from .smallvit import SmallViT, checkpoint_filter_fn

__all__ = [
    'QUICK_TRAINER_KEYS',
    'TRAIN_PY_DEFAULTS',
    'TRAIN_PY_WITHOUT',
    'NonFiniteLossError',
    'autocast_context',
    'load_recipe',
    'resolve_args',
    'train',
]

_logger = logging.getLogger(__name__)

# The train.py arguments this trainer honours, with train.py's defaults (tests check them against train.py's parser).
TRAIN_PY_DEFAULTS: dict[str, Any] = {
    # dataset
    'data_dir': None,
    'dataset': '',
    'dataset_download': False,
    'train_split': 'train',
    'val_split': 'validation',
    'class_map': '',
    'input_img_mode': None,
    'train_num_samples': None,  # here: use only the first N training images
    'val_num_samples': None,  # here: evaluate on the first N test images
    # model
    'model': 'resnet50',
    'pretrained': False,
    'pretrained_path': None,
    'initial_checkpoint': '',
    'resume': '',
    'no_resume_opt': False,
    'num_classes': None,
    'gp': None,
    'img_size': None,
    'in_chans': None,
    'input_size': None,
    'crop_pct': None,
    'mean': None,
    'std': None,
    'interpolation': '',
    'batch_size': 128,
    'validation_batch_size': None,
    'grad_checkpointing': False,
    'channels_last': False,
    'model_kwargs': {},
    'torchcompile_mode': None,
    'torchcompile': None,
    'device': 'cuda',  # here: cuda when available, else cpu
    'amp': False,
    'amp_dtype': 'float16',
    # optimizer
    'opt': 'sgd',
    'opt_eps': None,
    'opt_betas': None,
    'momentum': 0.9,
    'weight_decay': 2e-5,
    'clip_grad': None,
    'clip_mode': 'norm',
    'layer_decay': None,
    'opt_kwargs': {},
    # schedule
    'sched': 'cosine',
    'sched_on_updates': False,
    'lr': None,
    'lr_base': 0.1,
    'lr_base_size': 256,
    'lr_base_scale': '',
    'lr_cycle_mul': 1.0,
    'lr_cycle_decay': 0.5,
    'lr_cycle_limit': 1,
    'lr_k_decay': 1.0,
    'warmup_lr': 1e-5,
    'min_lr': 0,
    'epochs': 300,
    'start_epoch': None,
    'decay_milestones': [90, 180, 270],
    'decay_epochs': 90,
    'warmup_epochs': 5,
    'warmup_prefix': False,
    'cooldown_epochs': 0,
    'patience_epochs': 10,
    'decay_rate': 0.1,
    # augmentation and regularization
    'no_aug': False,
    'scale': [0.08, 1.0],
    'ratio': [3 / 4, 4 / 3],
    'hflip': 0.5,
    'color_jitter': 0.4,
    'reprob': 0.0,
    'remode': 'pixel',
    'recount': 1,
    'mixup': 0.0,
    'cutmix': 0.0,
    'cutmix_minmax': None,
    'mixup_prob': 1.0,
    'mixup_switch_prob': 0.5,
    'mixup_mode': 'batch',
    'mixup_off_epoch': 0,
    'smoothing': 0.1,
    'drop': 0.0,
    'drop_path': None,
    'model_ema': False,
    'model_ema_decay': 0.9998,
    'model_ema_warmup': False,
    # distillation (logit only)
    'kd_model_name': None,
    'kd_distill_type': 'logit',
    'kd_loss_type': 'kl',
    'distill_loss_weight': None,
    'task_loss_weight': None,
    'kd_temperature': 4.0,
    # misc
    'seed': 42,
    'log_interval': 50,
    'val_interval': 1,  # evaluate (and checkpoint) after every N-th epoch and the last, as train.py does
    'checkpoint_hist': 10,
    'output': '',
    'experiment': '',
    'eval_metric': 'top1',
}

# Recipe keys of this trainer that train.py has no argument for, with their defaults (which change nothing).
QUICK_TRAINER_KEYS: dict[str, Any] = {
    # From this epoch (0-based, as train.py's mixup_off_epoch) the training images are no longer cropped (flip and
    # erasing stay): the last epochs see whole images, as the test does. 0: crop to the end.
    'crop_off_epoch': 0,
    # Evaluate on each image and its mirror (flip test-time augmentation): the eval metrics are those of the mean of
    # the two logits (the reduction of train.py's --tta), and the single-view ones are kept as loss_single,
    # top1_single and top5_single (the numbers timm's validate.py gives the weights alone).
    'eval_hflip': False,
    # Minutes of training (wall time from the first step, evaluation included) to fit the schedule into: from the
    # second epoch until the last fifth of the schedule, the trainer sets epochs to what fits at the pace so far
    # (never above the recipe's: on a fast machine or a GPU they stand), scaling crop_off_epoch and mixup_off_epoch
    # with them. 0: no budget.
    'budget_minutes': 0,
}
# What train.py does instead when a recipe sets one of them (its --config takes them silently): for the warning of
# `smallvit train-py`.
TRAIN_PY_WITHOUT: dict[str, str] = {
    'crop_off_epoch': 'it crops to the last epoch',
    'eval_hflip': 'it evaluates one view of each image',
    'budget_minutes': "it trains the recipe's epochs, however long they take",
}
# The fitted schedule assumes each epoch takes this much longer than the mean so far: a VM's pace drifts within a
# run, and the epochs after the last refit are not measured.
_BUDGET_MARGIN = 1.03


# What timm's init_distributed_device adds to the args (and so to args.yaml), and the dataset's class names (for
# export's label_names): recorded in args.yaml, set again by every run that reads it as a recipe.
_RUNTIME_KEYS = ('distributed', 'local_rank', 'rank', 'world_size', 'label_names')


# Called with (epoch, 'train') before an epoch's training steps and (epoch, 'trained') after them: how
# scripts/benchmark.py profiles the recipe's own training steps and nothing around them.
_EPOCH_HOOKS: list[Callable[[int, str], None]] = []


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss became NaN or infinite."""


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe (train.py's --config format: a mapping of train.py argument names to values)."""
    path = Path(path)
    try:
        with path.open() as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ValueError(
            f'{path} is not valid YAML{where}: {problem}. A recipe is a mapping of `key: value` lines.'
        ) from None
    if not isinstance(recipe, dict):
        raise ValueError(f'{path}: a recipe is a YAML mapping of train.py argument names, got {type(recipe).__name__}.')
    return recipe


def resolve_args(recipe: dict[str, Any], **overrides: Any) -> argparse.Namespace:
    """Merge train.py's defaults, a recipe and overrides into the Namespace that checkpoints carry.

    Raises:
        ValueError: for keys this trainer does not honour (named), or values it cannot use.
    """
    # a run's args.yaml is a recipe too: the process layout it recorded is set again by the run that reads it
    merged = {k: v for k, v in recipe.items() if k not in _RUNTIME_KEYS}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(merged) - set(TRAIN_PY_DEFAULTS) - set(QUICK_TRAINER_KEYS))
    if unknown:
        raise ValueError(
            f'smallvit train does not honour recipe key(s): {", ".join(unknown)}. Remove them, or run the recipe '
            f"with timm's train.py (`smallvit train-py` prints its command line)."
        )
    args = argparse.Namespace(**{**TRAIN_PY_DEFAULTS, **QUICK_TRAINER_KEYS, **merged})
    if args.dataset and args.dataset not in TORCH_DATASETS:
        raise ValueError(
            f"dataset {args.dataset!r}: the quick trainer reads an image folder (dataset: '', data_dir: the folder "
            f'holding train/ and validation/) and {", ".join(TORCH_DATASETS)}.'
        )
    if args.data_dir is None:
        raise ValueError(
            'data_dir is not set: point it at the image folder (train/<class>/<images>, validation/<class>/...) or '
            "the torch/ dataset's files (Fashion-MNIST: the release *-ubyte.gz files)."
        )
    if args.pretrained_path and not args.pretrained:
        raise ValueError(
            f'pretrained_path {args.pretrained_path}: set pretrained: true as well (train.py loads it only then), or '
            'use initial_checkpoint.'
        )
    if args.amp and args.amp_dtype not in ('bfloat16', 'float16'):
        raise ValueError(f"amp_dtype {args.amp_dtype!r}: use 'bfloat16' or 'float16'.")
    budget = args.budget_minutes
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < math.inf:
        raise ValueError(f'budget_minutes {budget!r}: minutes of training to fit the schedule to, or 0 for none.')
    if budget and args.sched == 'plateau':
        raise ValueError('budget_minutes needs a schedule of known length; the plateau schedule has none.')
    _check_counts(args)
    if not isinstance(args.eval_hflip, bool):
        raise ValueError(f'eval_hflip {args.eval_hflip!r}: true or false (True or False with --set).')
    if isinstance(args.crop_off_epoch, bool) or not isinstance(args.crop_off_epoch, int) or args.crop_off_epoch < 0:
        raise ValueError(f'crop_off_epoch {args.crop_off_epoch!r}: an epoch number (0-based), or 0 to crop to the end.')
    # e.g. a recipe's epochs shortened with --set: say so rather than crop to the end silently
    if args.crop_off_epoch and args.crop_off_epoch >= args.epochs:
        _logger.warning(
            f'crop_off_epoch {args.crop_off_epoch} is not below epochs ({args.epochs}): every epoch crops. '
            'Lower crop_off_epoch with the epochs to keep whole images for the last epochs.'
        )
    if args.kd_model_name and args.kd_distill_type != 'logit':
        raise ValueError(f'kd_distill_type {args.kd_distill_type!r}: the quick trainer distills logits only.')
    if args.dataset and args.num_classes is None:
        args.num_classes = TORCH_DATASETS[args.dataset][5]  # an image folder's: its class folders, in train()
    if args.dataset and args.in_chans is None and args.input_size is None:
        args.in_chans = TORCH_DATASETS[args.dataset][3]  # the dataset's own channels (train.py would take 3)
    if args.device == 'cuda' and not torch.cuda.is_available():
        if merged.get('device') == 'cuda':  # named in the recipe: sized for a GPU, hours on a CPU
            _logger.warning(
                'The recipe asks for device: cuda, but no CUDA GPU is available: training on the CPU instead. '
                'Set device: cpu (and fewer epochs) to run it here on purpose.'
            )
        args.device = 'cpu'  # train.py's default device; here it means cuda when there is one
    return args


# (key, smallest value, may be None): integer recipe keys whose bad values would fail deep inside training
_COUNT_KEYS = (
    ('epochs', 1, False),
    ('batch_size', 1, False),
    ('validation_batch_size', 1, True),
    ('train_num_samples', 1, True),
    ('val_num_samples', 1, True),
    ('num_classes', 1, True),
    ('log_interval', 1, False),
    ('val_interval', 1, False),
    ('checkpoint_hist', 1, False),
    ('start_epoch', 0, True),
    ('seed', 0, False),
)


def _check_counts(args: argparse.Namespace) -> None:
    for key, low, optional in _COUNT_KEYS:
        value = getattr(args, key)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            unset = ', or leave it unset' if optional else ''
            raise ValueError(f'{key} {value!r}: expected a whole number of at least {low}{unset}.')
    if not isinstance(args.warmup_epochs, int) or isinstance(args.warmup_epochs, bool) or args.warmup_epochs < 0:
        raise ValueError(f'warmup_epochs {args.warmup_epochs!r}: expected a whole number of at least 0.')


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively: AVX512-BF16 or AMX on x86, oneDNN's bf16 path elsewhere.

    Without it PyTorch emulates bf16 matmuls, several times slower than float32. With it bf16 is usually the
    faster path, but not always: :func:`cpu_bf16_is_faster` measures.
    """
    if platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686'):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


BF16_MIN_SPEEDUP = 1.15  # bf16 costs precision; below this gain over float32 the trainer stays in float32


@functools.cache
def cpu_matmul_gflops() -> tuple[float, float]:
    """This CPU's float32 and bfloat16 matmul speed in GFLOP/s, measured once per process (about 0.1-0.5 s).

    Native bf16 is not always the fast path: on a 2-core Xeon whose VM exposes AVX512-BF16 but not AMX, bf16
    matmuls ran at half the float32 speed, and the 28 px recipe trained 1.45x faster in float32; on an AMD EPYC
    with AVX512-BF16, bf16 ran at 2.3x float32 (docs/benchmark.md). Flags cannot tell the two apart; a matmul can.
    """
    n, reps = 1024, 3
    speeds = []
    generator = torch.Generator().manual_seed(0)  # its own: the trainer has seeded the global one already
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, dtype=dtype, generator=generator) for _ in range(2))
        a @ b  # oneDNN builds its kernel on the first call
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        speeds.append(2 * n**3 / best / 1e9)
    return speeds[0], speeds[1]


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast pays on this CPU: native bf16 whose matmuls beat float32 by ``BF16_MIN_SPEEDUP``."""
    if not cpu_has_native_bf16():
        return False
    fp32, bf16 = cpu_matmul_gflops()
    return bf16 >= BF16_MIN_SPEEDUP * fp32


def _cpu_bf16_pays() -> bool:
    # each torchrun process timed bf16 against float32 for itself, and a close call can go either way: all take the
    # first process's answer, so they train alike
    faster = cpu_bf16_is_faster()
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(faster)])
        dist.broadcast(flag, src=0)
        faster = bool(flag.item())
    return faster


def _slow_bf16_reason() -> str:
    if not cpu_has_native_bf16():
        return 'this CPU has no native bfloat16 matrix instructions (no AVX512-BF16 / AMX), where bf16 is emulated'
    fp32, bf16 = cpu_matmul_gflops()
    return f'bf16 matmuls on this CPU run at {bf16:.0f} GFLOP/s against {fp32:.0f} in float32'


def autocast_context(args: argparse.Namespace, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast context factory the trainer runs under, for evaluating a model as it was trained.

    ``with autocast_context(args, device)(): model(x)``. bf16 (or float16 on CUDA) autocast when ``args.amp``;
    on a CPU where bf16 is not faster than float32 (:func:`cpu_bf16_is_faster`) a no-op, and ``args.amp`` is set
    False, so args.yaml records what ran.
    """
    if not args.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if device.type == 'cpu':
        if dtype != torch.bfloat16:
            raise ValueError('amp on CPU needs amp_dtype: bfloat16 (float16 autocast is for CUDA).')
        if not _cpu_bf16_pays():
            # the recipes ask for bf16 because it is the fast path where it exists; here it would be the slow one
            _logger.warning(f'amp: {_slow_bf16_reason()}: training in float32 instead.')
            args.amp = False
            return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _resolve_lr(args: argparse.Namespace) -> None:
    # train.py's rule: lr = lr_base * (global batch / lr_base_size), square-rooted for adaptive optimizers
    if args.lr:
        return
    batch_ratio = args.batch_size * args.world_size / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio**0.5
    args.lr = args.lr_base * batch_ratio


# Keys a resumed run honours when they differ from the checkpoint's: where and how long it runs, the schedule (rebuilt
# from them), evaluation, speed. Any other change would be recorded in args.yaml and the checkpoints without being
# run (the model, data and seed are the checkpoint's), so it is refused.
_RESUME_MAY_CHANGE = frozenset(
    {
        'resume', 'data_dir', 'dataset_download', 'output', 'experiment', 'device', 'log_interval', 'checkpoint_hist',
        'val_interval', 'epochs', 'start_epoch', 'crop_off_epoch', 'mixup_off_epoch', 'no_resume_opt',
        'validation_batch_size', 'eval_hflip', 'torchcompile', 'torchcompile_mode', 'grad_checkpointing',
        'channels_last', 'clip_grad', 'clip_mode', 'sched', 'sched_on_updates', 'warmup_epochs', 'warmup_lr',
        'warmup_prefix', 'min_lr', 'cooldown_epochs', 'decay_epochs', 'decay_milestones', 'decay_rate',
        'patience_epochs', 'lr_cycle_mul', 'lr_cycle_decay', 'lr_cycle_limit', 'lr_k_decay',
    }
)  # fmt: skip
# Honoured on resume only with no_resume_opt: otherwise the restored optimizer state brings its own values.
_OPTIMIZER_KEYS = frozenset(
    {'opt', 'opt_eps', 'opt_betas', 'opt_kwargs', 'momentum', 'weight_decay', 'layer_decay', 'lr', 'lr_base',
     'lr_base_size', 'lr_base_scale'}
)  # fmt: skip
_RUN_FILES = ('summary.csv', '*.pth.tar')  # what makes a folder hold a run (args.yaml alone: it died before epoch 1)


def _check_resume(args: argparse.Namespace) -> dict[str, Any]:
    """Check the resume checkpoint (readable, a training checkpoint, args it can honour) before anything is built.

    Returns the checkpoint's training args.
    """
    path = Path(args.resume)
    if not path.is_file():
        raise FileNotFoundError(
            f'resume {path}: no such checkpoint. Give the last.pth.tar (or a checkpoint-N.pth.tar) of the run to '
            'continue.'
        )
    try:
        ckpt = load_checkpoint_metadata(str(path))
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on damaged or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f'resume {path}: not a readable training checkpoint ({first}). Is it truncated? Resume from another '
            'checkpoint of the run (checkpoint-N.pth.tar).'
        ) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), dict) or 'epoch' not in ckpt:
        raise ValueError(
            f'resume {path}: not a timm training checkpoint (no state_dict and epoch). To start from weights alone, '
            f'use initial_checkpoint: {path}.'
        )
    saved = ckpt.get('args')
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    known = set(TRAIN_PY_DEFAULTS) | set(QUICK_TRAINER_KEYS)
    may_change = _RESUME_MAY_CHANGE | (_OPTIMIZER_KEYS if args.no_resume_opt else set())
    for key in sorted(known & set(saved) - may_change):
        if _same(saved[key], getattr(args, key)):
            continue
        why = (
            'the optimizer state it restores keeps its own; add no_resume_opt: true to start the optimizer afresh'
            if key in _OPTIMIZER_KEYS
            else "a resumed run continues the checkpoint's model, data and seed"
        )
        raise ValueError(
            f"resume {path}: {key} {getattr(args, key)!r} differs from the checkpoint's {saved[key]!r}, which a "
            f'resumed run cannot honour ({why}). Resume with {key}: {saved[key]!r}, or start a new run from its '
            f'weights with initial_checkpoint: {path}.'
        )
    return saved


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _holds_run(folder: Path) -> bool:
    return folder.is_dir() and any(next(folder.glob(pattern), None) for pattern in _RUN_FILES)


def _output_dir(args: argparse.Namespace, img_size: int) -> Path:
    """The run folder (not created yet): a new one, or the resumed run's own; never another run's."""
    if args.resume and not args.experiment:
        return Path(args.resume).parent  # continue the run in its folder
    name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(img_size)])
    out = Path(args.output or './output/train') / name
    if not _holds_run(out):
        return out
    if not args.resume:
        last = out / 'last.pth.tar'
        raise FileExistsError(
            f'{out} already holds a run. Choose another experiment name'
            + (f', or resume it with resume: {last}.' if last.is_file() else '.')
        )
    if out.resolve() != Path(args.resume).resolve().parent:
        raise FileExistsError(
            f'{out} holds another run: resuming {args.resume} there would overwrite its checkpoints and summary. '
            f'Leave experiment unset to continue in {Path(args.resume).parent}, or choose a new experiment name.'
        )
    return out


def _continue_in_place(out: Path, saver: CheckpointSaver, resume: Path, start_epoch: int) -> None:
    """Resuming into the run's own folder: keep its best checkpoint and history, one summary row per epoch."""
    later = [p.name for p in out.glob('checkpoint-*.pth.tar') if _epoch_of(p) >= start_epoch]
    best = out / 'model_best.pth.tar'
    best_meta = load_checkpoint_metadata(str(best)) if best.is_file() else None
    if best_meta is not None and best_meta.get('epoch', -1) >= start_epoch:
        later.append(best.name)
    if later:
        raise FileExistsError(
            f'resume {resume}: {out} already holds epochs from {start_epoch} on ({", ".join(sorted(later))}), which '
            f'resuming from epoch {start_epoch - 1} would overwrite. Resume from {out / "last.pth.tar"}, or into a new '
            'experiment folder.'
        )
    saver.load_state_dict_from_checkpoint(str(resume))  # timm's own bookkeeping: top-k files and the best metric
    if saver.best_metric is None and best_meta is not None:  # a checkpoint from before timm kept that state
        saver.best_metric, saver.best_epoch = best_meta.get('metric'), best_meta.get('epoch')
    summary = out / 'summary.csv'
    if summary.is_file():
        with summary.open(newline='') as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows if not (r and r[0].isdigit() and int(r[0]) >= start_epoch)]
        if len(kept) != len(rows):  # epochs logged after the checkpoint was written, run again now
            _logger.info(f'summary.csv: dropping {len(rows) - len(kept)} row(s) of epochs that are run again')
            with summary.open('w', newline='') as f:
                csv.writer(f).writerows(kept)


def _epoch_of(path: Path) -> int:
    tail = path.name[len('checkpoint-') : -len('.pth.tar')]
    return int(tail) if tail.isdigit() else -1


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
    if output_dir is not None and not _holds_run(output_dir):
        # nothing worth keeping (args.yaml only): the same command, with a lower lr, can start the run again
        (output_dir / 'args.yaml').unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            output_dir.rmdir()
    return message + (
        'No checkpoint was written (nothing kept): run the same command again with a lower lr, more warmup_epochs '
        'or clip_grad.'
    )


def _write_args(output_dir: Path, args: argparse.Namespace) -> None:
    """args.yaml as train.py writes it: what the run is, for `smallvit export` and a resume (again after a refit)."""
    (output_dir / 'args.yaml').write_text(yaml.safe_dump(vars(args), default_flow_style=False))


def _evaluate(task, model: torch.nn.Module, loader: BatchLoader, args, device, amp_autocast) -> OrderedDict:
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


def _create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler for ``args`` and the number of epochs it runs (cooldown included)."""
    return create_scheduler_v2(
        optimizer,
        **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch,
    )


def _set_epochs(args: argparse.Namespace, planned: dict[str, int], epochs: int) -> None:
    """Give ``args`` a schedule of ``epochs``, with the recipe's (``planned``) epoch switches scaled to it."""
    args.epochs = epochs
    for key in ('crop_off_epoch', 'mixup_off_epoch'):  # from the recipe's values: no compound rounding
        if planned[key]:
            setattr(args, key, round(planned[key] * epochs / planned['epochs']))


def _fit_to_budget(args: argparse.Namespace, epochs_done: int, elapsed_s: float) -> int:
    """The schedule's length in epochs that ends within ``args.budget_minutes``, at the pace of the epochs so far."""
    left = args.budget_minutes * 60 - elapsed_s
    # the mean epoch so far, not the last one: a single epoch's pace can be far from the run's
    fitted = epochs_done + max(0, math.floor(left / (elapsed_s / epochs_done * _BUDGET_MARGIN)))
    if args.distributed:  # every process must run the same schedule: the primary's measurement decides
        fitted_t = torch.tensor([fitted], dtype=torch.int64, device=args.device)
        dist.broadcast(fitted_t, src=0)
        fitted = int(fitted_t.item())
    return fitted


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


def _trainable(task: TrainingTask) -> torch.nn.Module:
    module = task.get_trainable_module()
    assert module is not None, 'a classification task always has a trainable model'
    return module


def _filter(model: torch.nn.Module) -> Callable | None:
    # smallvit's filter (position / patch embedding resampling); other timm models get their own from timm
    return checkpoint_filter_fn if isinstance(model, SmallViT) else None


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` (from :func:`resolve_args`) says.

    Returns:
        output_dir, eval_metrics (last epoch), best_metric/best_epoch, history (the metrics of each evaluated epoch,
        with cumulative wall time), model (the evaluated module, EMA if any, unwrapped), data_config, args.

    Raises:
        NonFiniteLossError: when the loss stops being finite; checkpoints from earlier epochs are kept.
    """
    device = init_distributed_device(args)  # torchrun: gloo on CPU, NCCL on CUDA
    torch.manual_seed(args.seed + args.rank)
    amp_autocast = autocast_context(args, device)
    loss_scaler = NativeScaler() if args.amp and args.amp_dtype == 'float16' else None
    primary = is_primary(args)
    _resolve_lr(args)  # before the resume check: a recipe's lr_base gives the lr the checkpoint recorded
    # the dataset is found and checked (folders listed, splits and classes matched) before anything is built
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
    resumed_args = _check_resume(args) if args.resume else {}

    in_chans = args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)
    model = _create_model(args, in_chans)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    built_for = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if args.img_size is None and args.input_size is None and built_for:
        # timm's pretrained_cfg keeps the size the weights were made at; model_kwargs img_size builds another
        data_config['input_size'] = (data_config['input_size'][0], *built_for)
    img_size = tuple(data_config['input_size'][1:])
    output_dir = _output_dir(args, img_size[-1]) if primary else None  # refused now, before data or training
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if primary:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f'Model {args.model} created, {n_params:,} parameters, input {data_config["input_size"]}')

    data.check_memory(in_chans, img_size)
    decode = dict(
        in_chans=in_chans,
        img_size=img_size,
        input_img_mode=args.input_img_mode,
        interpolation=data_config['interpolation'],
        progress=primary,
    )
    train_split, eval_split = data.load('train', **decode), data.load('val', **decode)
    train_x, train_y = train_split.images, train_split.labels
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
        **common,
    )
    loader_eval = BatchLoader(eval_x, eval_y, args.validation_batch_size or args.batch_size, **common)
    if len(loader_train) == 0:
        raise ValueError(
            f'{len(train_x)} training images make no full batch of {args.batch_size} x {args.world_size} process(es): '
            'lower batch_size or raise train_num_samples.'
        )

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
            verbose=primary,
        )
    else:
        task = ClassificationTask(model, criterion=train_loss_fn, device=device, verbose=primary)

    optimizer = create_optimizer_v2(_trainable(task), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    resume_epoch = None
    if args.resume:
        try:
            resume_epoch = resume_task_checkpoint(
                task,
                args.resume,
                optimizer=None if args.no_resume_opt else optimizer,
                loss_scaler=None if args.no_resume_opt else loss_scaler,
                log_info=primary,
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

    updates_per_epoch = len(loader_train)
    lr_scheduler, num_epochs = _create_scheduler(args, optimizer, updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if args.resume and start_epoch >= num_epochs:
        raise ValueError(
            f'resume {args.resume}: the checkpoint ends epoch {start_epoch - 1}, and epochs is {args.epochs}: nothing '
            f'is left to train. Raise epochs to continue the run.'
        )
    refit = bool(args.budget_minutes) and start_epoch == 0  # fit the schedule to budget_minutes as it goes
    planned = {k: getattr(args, k) for k in ('epochs', 'crop_off_epoch', 'mixup_off_epoch')}
    if args.budget_minutes and not refit and primary:
        _logger.warning(
            f'budget_minutes {args.budget_minutes}: a resumed run keeps the epochs it was given ({args.epochs}); '
            "set epochs (and crop_off_epoch) to the fitted values in the first run's args.yaml to resume it as fitted."
        )
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = None
    if primary:
        assert output_dir is not None  # the primary process writes the run
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
            _continue_in_place(output_dir, saver, Path(args.resume), start_epoch)
        _write_args(output_dir, args)
        _logger.info(f'Output to {output_dir}; {num_epochs} epochs of {updates_per_epoch} steps, lr {args.lr:.3g}')

    eval_metrics: dict[str, float] = {}
    best_metric = best_epoch = None
    history: list[dict[str, float]] = []  # per evaluated epoch, with cumulative wall time (accuracy-vs-time plots)
    metric: float | None = None  # the epoch's eval_metric, None after an epoch val_interval skips
    t_start = time.perf_counter()
    num_updates = start_epoch * updates_per_epoch
    epoch = start_epoch
    while epoch < num_epochs:  # budget_minutes can change num_epochs as the run goes
        loader_train.set_epoch(epoch)
        for hook in _EPOCH_HOOKS:
            hook(epoch, 'train')
        torch.manual_seed(args.seed + args.rank + 7919 * epoch)  # dropout etc.: a resumed run repeats this epoch
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        if augment is not None and args.crop_off_epoch and epoch >= args.crop_off_epoch:
            augment.scale = None  # whole images from here on; flip, jitter and erasing as before
        trainable = _trainable(task)
        trainable.train()
        loss_sum, loss_count, seen, t_epoch = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(
            loader_train,
            total=updates_per_epoch,
            desc=f'epoch {epoch + 1}/{num_epochs}',
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
        for hook in _EPOCH_HOOKS:
            hook(epoch, 'trained')
        train_loss = torch.tensor([loss_sum / max(loss_count, 1)], device=device)
        if args.distributed:
            dist.all_reduce(train_loss)
            train_loss /= args.world_size
        train_metrics = OrderedDict(loss=train_loss.item())
        train_time = time.perf_counter() - t_epoch

        if (epoch + 1) % args.val_interval and epoch + 1 != num_epochs:
            # train.py's --val-interval: no evaluation, summary row or checkpoint after this epoch
            metric = None
            if primary:
                _logger.info(
                    f'epoch {epoch + 1}/{num_epochs}  train loss {train_metrics["loss"]:.4f}  (not evaluated: '
                    f'val_interval {args.val_interval})  ({train_time:.0f}s, {seen / train_time:.0f} img/s)'
                )
        else:
            # with an EMA only the EMA is evaluated: its metrics are the ones recorded (as in train.py's summary), and
            # a second pass over the test set for the raw weights would cost time for a number nobody sees
            eval_model = task.get_eval_model(ema=task.has_ema())
            assert eval_model is not None
            t_eval = time.perf_counter()
            eval_metrics = _evaluate(task, eval_model, loader_eval, args, device, amp_autocast)
            eval_time = time.perf_counter() - t_eval
            metric = eval_metrics[args.eval_metric]
            lrs = [group['lr'] for group in optimizer.param_groups]
            if primary:
                assert output_dir is not None and saver is not None
                update_summary(
                    epoch,
                    train_metrics,
                    eval_metrics,
                    filename=str(output_dir / 'summary.csv'),
                    lr=sum(lrs) / len(lrs),
                )  # timm writes the header when the file is new, so a resumed run appends to its own log
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
                _logger.info(
                    f'epoch {epoch + 1}/{num_epochs}  train loss {train_metrics["loss"]:.4f}  '
                    f'eval loss {eval_metrics["loss"]:.4f}  top-1 {eval_metrics["top1"]:.2f}  '
                    f'top-5 {eval_metrics["top5"]:.2f}  '
                    + (f'(single view {eval_metrics["top1_single"]:.2f})  ' if args.eval_hflip else '')
                    + f'({train_time:.0f}s, {seen / train_time:.0f} img/s)'
                )
            history.append(
                dict(
                    epoch=epoch,
                    wall_time=time.perf_counter() - t_start,
                    train_time=train_time,
                    train_images=seen,
                    eval_time=eval_time,
                    train_loss=train_metrics['loss'],
                    **eval_metrics,
                )
            )
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metric)
        # After each epoch from the second, the pace so far says how many epochs fit the budget. Refits stop before
        # the last fifth and before crop/mixup switch off: late in a cosine a change of length would jolt the low lr.
        switches = [args.crop_off_epoch or num_epochs, args.mixup_off_epoch or num_epochs]
        if refit and epoch >= 1 and epoch + 1 < min(0.8 * num_epochs, *switches):
            elapsed = time.perf_counter() - t_start
            extra = num_epochs - args.epochs  # cooldown epochs the scheduler factory added
            fitted = min(_fit_to_budget(args, epoch + 1, elapsed), planned['epochs'] + extra)
            if fitted != num_epochs:
                before = num_epochs
                _set_epochs(args, planned, max(fitted - extra, 1))
                # the optimizer keeps its initial_lr, so the new schedule starts from the same base
                lr_scheduler, num_epochs = _create_scheduler(args, optimizer, updates_per_epoch)
                lr_scheduler.step(epoch + 1, metric)
                lr_scheduler.step_update(num_updates=num_updates)
                if primary:
                    assert output_dir is not None
                    _write_args(output_dir, args)
                    _logger.info(
                        f'budget_minutes {args.budget_minutes}: {epoch + 1} epochs in {elapsed:.0f} s, '
                        f'{num_epochs} epochs in all instead of {before}'
                        + (f' (crop_off_epoch {args.crop_off_epoch})' if args.crop_off_epoch else '')
                    )
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
