"""The recipe schema of the quick trainer: train.py's argument names and defaults, its own few keys, the checks.

Recipes are YAML files with train.py's argument names, so the same file drives ``train.py --config``. The quick
trainer (:mod:`timm_smallvit.trainer`) honours the keys listed in :data:`TRAIN_PY_DEFAULTS` (with train.py's defaults)
and the few of its own in :data:`QUICK_TRAINER_KEYS` (which train.py does not know: ``smallvit train-py`` warns that
they go unused there), and refuses any other key by name rather than ignore it. A resumed run is checked against its
checkpoint's recipe (:func:`check_resume`) before anything is built, and a run's folder (:func:`run_folder`) never
holds another run; its ``args.yaml`` (:func:`write_args`) is a recipe again.
"""

import argparse
import contextlib
import csv
import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from timm.models import safe_model_name
from timm.utils import CheckpointSaver, load_checkpoint_metadata, update_summary

from ._files import check_zip, disk_full_error, is_disk_full
from .data import TORCH_DATASETS
from .preprocess import check_data_config, check_side
from .smallvit import SmallViT

__all__ = [
    'BOOL_KEYS',
    'QUICK_TRAINER_KEYS',
    'TRAIN_PY_DEFAULTS',
    'TRAIN_PY_WITHOUT',
    'check_resume',
    'continue_in_place',
    'holds_run',
    'load_recipe',
    'parse_bool',
    'resolve_args',
    'resolve_lr',
    'run_folder',
    'save_epoch',
    'write_args',
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
    # Hold out N images of the training split (a fixed random draw, the same for every seed) as the evaluation set:
    # the run trains on the rest and never reads the validation split, so a recipe can be chosen without looking at
    # the test images. 0: evaluate on the validation split.
    'val_holdout': 0,
    # Mirror each training image every other epoch, half of them from the first (airbench's alternating flip),
    # instead of a coin flip per image and epoch (hflip must be above 0; its value no longer matters).
    'alternate_flips': False,
    # Training compute to fit the schedule into, in TFLOP (10^12 FLOPs): FLOPs per training image of the whole step
    # (forward and backward, a distillation teacher's forward included; counted with FlopCounterMode) times the
    # images trained on. Decided before the first step, the same on any machine: the epochs are cut to what fits
    # (never raised), crop_off_epoch and mixup_off_epoch scaled with them. 0: no budget.
    'budget_tflop': 0,
    # The training compute of the distillation teacher (kd_model_name), in TFLOP, counted towards budget_tflop and
    # the run's logged compute as spent before its first step (the teacher's card or args.yaml states it).
    'kd_teacher_tflop': 0,
}
# What train.py does instead when a recipe sets one of them (its --config takes them silently): for the warning of
# `smallvit train-py`.
TRAIN_PY_WITHOUT: dict[str, str] = {
    'crop_off_epoch': 'it crops to the last epoch',
    'eval_hflip': 'it evaluates one view of each image',
    'budget_minutes': "it trains the recipe's epochs, however long they take",
    'val_holdout': 'it trains on every training image and evaluates on the validation split',
    'alternate_flips': 'it flips each image at random (hflip)',
    'budget_tflop': "it trains the recipe's epochs, whatever compute they take",
    'kd_teacher_tflop': 'it counts no training compute',
}

# What timm's init_distributed_device adds to the args (and so to args.yaml), and the dataset's class names (for
# export's label_names): recorded in args.yaml, set again by every run that reads it as a recipe.
_RUNTIME_KEYS = (
    'distributed', 'local_rank', 'rank', 'world_size', 'label_names',
    # what the run measured of itself (budget.training_compute and the trainer): for the card, never a setting
    'train_gflop_per_image', 'train_tflop', 'train_wall_s', 'train_device',
)  # fmt: skip


# every boolean recipe key (its default is a bool): read by parse_bool, from YAML and --set alike
BOOL_KEYS = frozenset(k for k, v in {**TRAIN_PY_DEFAULTS, **QUICK_TRAINER_KEYS}.items() if isinstance(v, bool))
_TRUE, _FALSE = ('true', 'yes', '1'), ('false', 'no', '0')


def parse_bool(key: str, value: Any) -> bool:
    """A boolean recipe value: a bool, or true/false, yes/no, 1/0 in any case; anything else a one-line error.

    ``--set amp=false`` gives the string 'false' (timm's ParseKwargs keeps what literal_eval cannot read), which
    Python takes as true: every boolean key goes through here, so 'false' means false wherever it comes from.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f'{key} {value!r}: expected true or false (also yes/no, 1/0, in any case).')


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


def resolve_args(recipe: dict[str, Any], *, source: str = 'the recipe', **overrides: Any) -> argparse.Namespace:
    """Merge train.py's defaults, a recipe and overrides into the Namespace that checkpoints carry.

    Sizes (img_size, input_size, model_kwargs img_size) and the preprocessing (mean, std, interpolation, crop_pct) are
    checked by :mod:`timm_smallvit.preprocess` before anything is built or allocated.

    Args:
        recipe: The recipe's keys (:func:`load_recipe`).
        source: What the recipe was read from, named in errors.
        **overrides: Keys set on top (``--set``, ``--data-dir``, ...).

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
    for key in BOOL_KEYS & set(merged):
        merged[key] = parse_bool(key, merged[key])  # so args.yaml records what ran: a bool
    args = argparse.Namespace(**{**TRAIN_PY_DEFAULTS, **QUICK_TRAINER_KEYS, **merged})
    _check_model(args, source)
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
    for key in ('initial_checkpoint', 'pretrained_path'):  # weights read later by timm, which does not check the CRC
        if getattr(args, key) and Path(getattr(args, key)).is_file():
            check_zip(getattr(args, key), f'{key} {getattr(args, key)}')
    if args.amp and args.amp_dtype not in ('bfloat16', 'float16'):
        raise ValueError(f"amp_dtype {args.amp_dtype!r}: use 'bfloat16' or 'float16'.")
    for key, what in (
        ('budget_minutes', 'minutes of training to fit the schedule to'),
        ('budget_tflop', 'training compute (TFLOP) to fit the schedule to'),
        ('kd_teacher_tflop', "the distillation teacher's training compute (TFLOP)"),
    ):
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f'{key} {value!r}: {what}, or 0 for none.')
        if value and key.startswith('budget') and args.sched == 'plateau':
            raise ValueError(f'{key} needs a schedule of known length; the plateau schedule has none.')
    if args.budget_tflop and args.kd_model_name and not args.kd_teacher_tflop:
        raise ValueError(
            f"budget_tflop with kd_model_name {args.kd_model_name}: the teacher's own training counts towards the "
            "budget. Set kd_teacher_tflop to its training compute (its card's or args.yaml's train_tflop)."
        )
    _check_counts(args)
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
    _check_preprocessing(args, source)
    if args.device == 'cuda' and not torch.cuda.is_available():
        if merged.get('device') == 'cuda':  # named in the recipe: sized for a GPU, hours on a CPU
            _logger.warning(
                'The recipe asks for device: cuda, but no CUDA GPU is available: training on the CPU instead. '
                'Set device: cpu (and fewer epochs) to run it here on purpose.'
            )
        args.device = 'cpu'  # train.py's default device; here it means cuda when there is one
    return args


def _check_preprocessing(args: argparse.Namespace, source: str) -> None:
    # the channels train() builds the model with: in_chans, else input_size's, else train.py's 3
    chans = args.in_chans if args.in_chans is not None else (None if args.input_size is not None else 3)
    keys = ('in_chans', 'input_size', 'img_size', 'mean', 'std', 'interpolation', 'crop_pct')
    check_data_config({k: getattr(args, k) for k in keys}, source=source, in_chans=chans)


def _check_model(args: argparse.Namespace, source: str) -> None:
    # what timm would otherwise answer with a traceback from deep inside create_model or the optimizer
    name = args.model
    if not isinstance(name, str) or not (name.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(name)):
        raise ValueError(
            f"model {name!r}: no such timm model. `smallvit recipes` lists recipes; timm.list_models('smallvit*') "
            'the smallvit models.'
        )
    lr = args.lr
    if isinstance(lr, str):  # YAML reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            lr = args.lr = float(lr)
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < math.inf):
        raise ValueError(f"lr {lr!r}: a positive number (e.g. 1e-3), or leave it unset for train.py's rule.")
    if args.img_size is not None:  # bounded before a model or a batch is made at that size
        check_side(args.img_size, 'img_size', source)
    kwargs = args.model_kwargs
    if not isinstance(kwargs, dict):
        raise ValueError(
            f'model_kwargs {kwargs!r}: a mapping of model arguments, e.g. {{img_size: 56}} in YAML or '
            f'--set "model_kwargs={{\'img_size\': 56}}".'
        )
    if name.startswith('smallvit'):
        known = set(inspect.signature(SmallViT.__init__).parameters) - {'self', 'kwargs'}
        unknown = sorted(set(map(str, kwargs)) - known)
        if unknown:
            raise ValueError(
                f'model_kwargs: {", ".join(unknown)} is not an argument of {name} (SmallViT takes '
                f'{", ".join(sorted(known))}).'
            )
    if kwargs.get('img_size') is not None:  # the model's size: its position embedding is allocated at it
        check_data_config({'img_size': kwargs['img_size']}, source=f'{source}: model_kwargs')


# (key, smallest value, may be None): integer recipe keys whose bad values would fail deep inside training
_COUNT_KEYS = (
    ('epochs', 1, False),
    ('batch_size', 1, False),
    ('validation_batch_size', 1, True),
    ('train_num_samples', 1, True),
    ('val_num_samples', 1, True),
    ('val_holdout', 0, False),
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


def resolve_lr(args: argparse.Namespace) -> None:
    """Set ``args.lr`` where the recipe gives none, by train.py's rule (an lr the recipe gives stands)."""
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


def check_resume(args: argparse.Namespace) -> dict[str, Any]:
    """Check the resume checkpoint (readable, a training checkpoint, args it can honour) before anything is built.

    Returns the checkpoint's training args.
    """
    path = Path(args.resume)
    if not path.is_file():
        raise FileNotFoundError(
            f'resume {path}: no such checkpoint. Give the last.pth.tar (or a checkpoint-N.pth.tar) of the run to '
            'continue.'
        )
    check_zip(path, f'resume {path}')  # the weights it continues from, read against their CRC (torch.load does not)
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


# ----------------------------------------------------------------------------------------------------------------
# the run folder: where a recipe's run is written, and what resuming it may overwrite

# what makes a folder hold a run: a summary or a checkpoint, not timm's tmp.pth.tar (a checkpoint being written) nor
# args.yaml alone (it died before its first checkpoint)
_RUN_FILES = ('summary.csv', 'last.pth.tar', 'checkpoint-*.pth.tar', 'model_best.pth.tar')
_FIRST_SUMMARY = '.summary.csv.first'  # the first epoch's row, until the first checkpoint is in place


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run: a summary or a checkpoint (args.yaml alone: it died before epoch 1)."""
    return folder.is_dir() and any(next(folder.glob(pattern), None) for pattern in _RUN_FILES)


def run_folder(args: argparse.Namespace, img_size: int) -> Path:
    """The run folder (not created yet): a new one, or the resumed run's own; never another run's."""
    if args.resume and not args.experiment:
        return Path(args.resume).parent  # continue the run in its folder
    name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(img_size)])
    out = Path(args.output or './output/train') / name
    if not holds_run(out):
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


def continue_in_place(out: Path, saver: CheckpointSaver, resume: Path, start_epoch: int) -> None:
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


def save_epoch(
    saver: CheckpointSaver,
    out: Path,
    epoch: int,
    train_metrics: dict[str, Any],
    eval_metrics: dict[str, Any],
    lr: float,
    metric: float | None,
) -> tuple[Any, Any]:
    """The epoch's summary row and checkpoint (timm's update_summary and save_checkpoint); returns the best so far.

    The first checkpoint makes the folder a run: until it is in place the first row waits under another name, so a
    kill or a full disk there leaves either a resumable run or nothing (args.yaml alone, which the same command
    replaces). A full disk is a one-line error with the megabytes needed.
    """
    first = not (out / 'last.pth.tar').is_file()
    summary = out / (_FIRST_SUMMARY if first else 'summary.csv')
    if first:
        summary.unlink(missing_ok=True)  # the row of a run killed before its first checkpoint
    update_summary(epoch, train_metrics, eval_metrics, str(summary), lr=lr)  # the header when the file is new
    try:
        best = saver.save_checkpoint(epoch, metric=metric)
    except (OSError, RuntimeError) as e:
        (out / 'tmp.pth.tar').unlink(missing_ok=True)  # timm's half-written checkpoint: the disk space it took
        if first:  # nothing left of the run but its folder, which the same command takes again
            summary.unlink(missing_ok=True)
            (out / 'args.yaml').unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        if is_disk_full(e):
            raise disk_full_error(out / 'last.pth.tar', _state_bytes(saver), 'the checkpoint') from None
        raise
    if first:
        os.replace(summary, out / 'summary.csv')
    return best


def _state_bytes(saver: CheckpointSaver) -> int:
    # what a checkpoint holds: the weights, the optimizer's state and the EMA weights
    tensors = list(saver.model.state_dict().values())
    optimizer = getattr(saver, 'optimizer', None)
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    ema = getattr(saver, 'model_ema', None)
    if ema is not None:
        tensors += list(ema.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors)


def _epoch_of(path: Path) -> int:
    tail = path.name[len('checkpoint-') : -len('.pth.tar')]
    return int(tail) if tail.isdigit() else -1


def write_args(output_dir: Path, args: argparse.Namespace) -> None:
    """args.yaml as train.py writes it: what the run is, for `smallvit export` and a resume (again after a refit)."""
    (output_dir / 'args.yaml').write_text(yaml.safe_dump(vars(args), default_flow_style=False))
