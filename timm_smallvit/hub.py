"""Share smallvit models through the Hugging Face Hub: export a training checkpoint, push it, load it with timm.

    export_checkpoint   timm training checkpoint (or .safetensors) -> a folder timm loads: model.safetensors,
                        config.json (timm's own save_for_hf), README.md (model card), learning_curve.png
    push_to_hub         that folder -> a Hub repo, through huggingface_hub (create_repo, create_commit): those four
                        files only, regular files only (never through a symbolic link), all checked first
    create_model        timm.create_model after the import that registers smallvit*, checking hf-hub: and
                        local-dir: files first so that bad exports fail with a message instead of odd timm errors

Checkpoints are read by timm (``timm.utils.load_checkpoint_metadata``, ``timm.models.load_state_dict``), with
``torch.load(weights_only=True)`` allowing only the ``argparse.Namespace`` that timm's train.py stores under 'args',
or with safetensors; nothing else is unpickled. The model card is rendered from model_cards/smallvit.md, and push
renders it again, from the values export kept in it, to name the Hub repo.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jinja2
import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
    hf_hub_download,
)
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id
from timm.data import create_transform, resolve_model_data_config
from timm.models import load_state_dict, save_for_hf
from timm.models._hub import hf_split  # no public name in timm 1.0.31
from timm.utils import load_checkpoint_metadata
from torch.utils.flop_counter import FlopCounterMode

from .data import FASHION_MNIST_CLASSES
from .smallvit import SmallViT, _blocks, explicit_attention

__all__ = ['create_model', 'export_checkpoint', 'push_to_hub', 'read_summary']

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
CURVE_NAME = 'learning_curve.png'
GRID_NAME = 'predictions.png'
TEMPLATE_NAME = 'smallvit.md'
# everything export writes, and everything push uploads
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, CURVE_NAME, GRID_NAME)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# an export in progress (or killed) lives in .<out name>.export-<pid>-<random> beside the out folder
_TMP_NAME = re.compile(r'\..+\.export-(?:(?P<pid>\d+)-[a-z0-9_]{8}|[a-z0-9_]{8})')
_STALE_AFTER_S = 15 * 60  # a temp folder without a pid (older versions) is left alone for this long

# normalized dataset name -> (Hub dataset id, display name, class names)
_DATASETS: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    'fashionmnist': ('zalando-datasets/fashion_mnist', 'Fashion-MNIST', FASHION_MNIST_CLASSES),
    'mnist': ('ylecun/mnist', 'MNIST', None),
    'cifar10': ('uoft-cs/cifar10', 'CIFAR-10', None),
    'cifar100': ('uoft-cs/cifar100', 'CIFAR-100', None),
}
# train.py's argument dests shown in the card's recipe table, in this order
_RECIPE_KEYS = (
    ('dataset', 'dataset'),
    ('epochs', 'epochs'),
    ('batch_size', 'batch size'),
    ('opt', 'optimizer'),
    ('lr', 'learning rate'),
    ('weight_decay', 'weight decay'),
    ('sched', 'schedule'),
    ('warmup_epochs', 'warmup epochs'),
    ('smoothing', 'label smoothing'),
    ('mixup', 'mixup alpha'),
    ('cutmix', 'cutmix alpha'),
    ('drop', 'dropout (head)'),
    ('drop_path', 'drop path'),
    ('model_ema', 'EMA of weights'),
    ('model_ema_decay', 'EMA decay'),
    ('amp', 'mixed precision'),
    ('amp_dtype', 'AMP dtype'),
    ('seed', 'seed'),
    ('train_num_samples', 'training images (first N)'),
    ('val_num_samples', 'evaluation images (first N)'),
)
_SHIPPED_WEIGHTS_KEYS = ('tag', 'file', 'url', 'hf_hub_id', 'label_names', 'label_descriptions', 'description',
                         'origin_url', 'notes', 'paper_name', 'paper_ids')  # fmt: skip
_DATA_KEYS = ('mean', 'std', 'interpolation', 'crop_pct', 'crop_mode', 'input_size', 'img_size', 'in_chans')
# the card's last line keeps what the template rendered it from (but model_ref), so that push can render it again
_CARD_CONTEXT = '<!-- timm-smallvit card: '


# ---- export --------------------------------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool = False,
    overwrite: bool = False,
    repo_id: str | None = None,
    summary: str | os.PathLike | None = None,
) -> Path:
    """Write a folder that timm loads (and the Hub shows) from a smallvit training checkpoint.

    The model is rebuilt from the checkpoint's own training args (model, num_classes, in_chans, gp, model_kwargs),
    the weights are loaded strictly, and the folder gets model.safetensors, config.json (timm's save_for_hf), a
    README.md model card, and learning_curve.png when the run's summary.csv is there. Everything is written to a
    temporary folder first and renamed into place at the end, so an interrupted export leaves no half-written
    out_dir; the temporary folder of a killed export is removed by the next export into the same parent folder.
    Weights with NaN or inf are refused.

    Args:
        checkpoint: A timm training checkpoint (checkpoint-N.pth.tar, model_best.pth.tar, last.pth.tar) or a
            .safetensors / plain state-dict file (those carry no args: give model_name).
        out_dir: Folder to create. It must not exist or be empty, unless overwrite.
        model_name: smallvit model name; default: the checkpoint's args.model.
        model_kwargs: Model arguments on top of the checkpoint's args.model_kwargs (e.g. img_size).
        use_ema: Export the EMA weights (state_dict_ema) instead of the trained ones.
        overwrite: Replace a non-empty out_dir.
        repo_id: Hub repo the card's usage snippet names; default: the local folder (push_to_hub sets the repo).
        summary: The run's summary.csv; default: summary.csv beside the checkpoint, if any.

    Returns:
        The written folder.
    """
    checkpoint = Path(checkpoint)
    out = Path(out_dir)
    summary_path = Path(summary) if summary is not None else checkpoint.parent / 'summary.csv'
    _check_out_dir(out, overwrite, inputs=[checkpoint, summary_path])
    state_dict, info = _read_checkpoint(checkpoint, use_ema)
    _check_finite(state_dict, checkpoint, use_ema)
    args = info['args']
    model, name = _rebuild(state_dict, args, model_name, model_kwargs, source=checkpoint)
    rows = read_summary(summary_path) if summary_path.is_file() else []
    if summary is not None and not rows:
        raise ValueError(f'{summary_path} has no epoch rows: pass the summary.csv that timm wrote for this run.')
    if args.get('eval_hflip'):
        rows = [_single_view(row) for row in rows]

    hub_dataset, dataset_name, _ = _DATASETS.get(_dataset_key(args.get('dataset')), (None, None, None))
    labels = _labels(args, model.num_classes)
    model_config: dict[str, Any] = {'label_names': list(labels)} if labels else {}
    data_config = _data_config(args)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_exports(out.parent)
    # the pid in the name tells a killed export's folder from one in progress
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.export-{os.getpid()}-', dir=out.parent))
    try:
        try:
            save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)
        except ValueError as e:
            raise ValueError(f'The training args of {checkpoint} do not fit the model: {e}') from e
        _check_reload(model, tmp, checkpoint)
        if rows:
            _plot_learning_curve(rows, tmp / CURVE_NAME, title=name)
        grid = _prediction_grid(model, args, labels, tmp / GRID_NAME, title=name)
        card = _model_card(
            model,
            name,
            json.loads((tmp / CONFIG_NAME).read_text()),
            args=args,
            info=info,
            rows=rows,
            checkpoint=checkpoint,
            model_ref=f'hf-hub:{repo_id}' if repo_id else f'local-dir:{out}',
            model_name=repo_id.split('/')[-1] if repo_id else name,
            dataset=(hub_dataset, dataset_name or args.get('dataset') or _folder_name(args)),
            curve=CURVE_NAME if rows else None,
            grid=grid,
        )
        card.save(tmp / CARD_NAME)
        # mkdtemp and safetensors create private files; an export is an ordinary, shareable folder
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info('Exported %s (%s) to %s', checkpoint, name, out)
    return out


def _check_out_dir(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f'{out} exists and is not a folder: choose another OUT_DIR.')
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f'{out} is not empty: choose a new OUT_DIR, or pass --overwrite (overwrite=True).')
        for path in inputs:
            if path.exists() and out.resolve() in path.resolve().parents:
                raise ValueError(f'{out} holds {path}, an input of this export: choose an OUT_DIR outside it.')


def _remove_stale_exports(parent: Path) -> None:
    """Remove the temporary folders that killed exports (SIGKILL, SIGTERM, power loss) left in parent."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = _TMP_NAME.fullmatch(entry.name)
        if match is None or not _is_stale_export(entry, match['pid']):
            continue
        try:
            shutil.rmtree(entry.path)
        except OSError as e:  # another export removing it too, or not ours to remove
            _logger.debug('Could not remove %s: %s', entry.path, e)
        else:
            _logger.info('Removed %s, left by an interrupted export.', entry.path)


def _is_stale_export(entry: os.DirEntry, pid: str | None) -> bool:
    # only a real folder (never a link) that holds nothing but regular files an export writes
    try:
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            return False
        with os.scandir(entry.path) as inside:
            if any(f.name not in EXPORT_FILES or not f.is_file(follow_symlinks=False) for f in inside):
                return False
        if pid is None:  # written by an older version, without its pid
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > _STALE_AFTER_S
    except OSError:
        return False
    return not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    if os.name != 'posix':  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _check_finite(state_dict: dict[str, torch.Tensor], checkpoint: Path, use_ema: bool) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        which = 'EMA weights' if use_ema else 'weights'
        raise ValueError(
            f'{checkpoint} has non-finite {which} (NaN or inf) in {_head(bad, 3)}: the run diverged. Nothing was '
            f'exported; export an earlier checkpoint (checkpoint-N.pth.tar from before the loss became NaN).'
        )


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:  # filled while we were exporting
            raise FileExistsError(f'{out} is not empty: choose a new OUT_DIR, or pass --overwrite (overwrite=True).')
        old = out.with_name(f'.{out.name}.old-{uuid.uuid4().hex[:8]}')
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    os.rename(tmp, out)


def _read_checkpoint(
    path: Path, use_ema: bool, *, ema_required: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and {'args', 'epoch', 'metric', 'ema'} of a training checkpoint, or of a bare weights file.

    timm reads the file: ``load_checkpoint_metadata`` for what the checkpoint says besides its weights (train.py's
    args, epoch, metric; tensors memory-mapped, so it is cheap) and ``load_state_dict`` for the weights (the EMA or
    the trained ones, DDP / torch.compile prefixes removed). Both unpickle with ``weights_only``, allowing only the
    argparse.Namespace of train.py's args. With use_ema, a checkpoint without EMA weights is an error, or, when not
    ema_required, gives its trained weights (info['ema'] says which).
    """
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint at {path}.')
    info: dict[str, Any] = {'args': {}, 'epoch': None, 'metric': None, 'ema': False}
    if path.suffix == '.safetensors':
        if use_ema and ema_required:
            raise ValueError(f'{path} holds a single set of weights: --ema (use_ema) applies to training checkpoints.')
        try:
            return load_state_dict(str(path), use_ema=False), info
        except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError on bad files
            raise ValueError(f'{path} is not a readable safetensors file ({e}). Is it truncated?') from e

    ckpt = _torch_read(path, load_checkpoint_metadata)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict.')
    has_ema = any(isinstance(ckpt.get(k), dict) for k in ('state_dict_ema', 'model_ema'))
    if use_ema and not has_ema and ema_required:
        raise ValueError(
            f'{path} has no EMA weights (state_dict_ema): train with --model-ema, or export without --ema.'
        )
    info['ema'] = use_ema and has_ema
    # the entry timm's load_state_dict takes the weights from (None: a bare state dict), checked before it is read
    if info['ema']:
        key = next((k for k in ('state_dict_ema', 'model_ema') if ckpt.get(k) is not None), None)
    else:
        key = next((k for k in ('state_dict', 'model') if k in ckpt), None)
    weights = ckpt[key] if key else ckpt
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f'{path} has no state dict of tensors (keys: {_head(list(ckpt))}).')
    if key:
        args = ckpt.get('args')
        if isinstance(args, argparse.Namespace):
            info['args'] = vars(args)
        elif isinstance(args, Mapping) or args is None:
            info['args'] = dict(args or {})
        else:
            raise ValueError(
                f"{path}: 'args' is a {type(args).__name__}, not train.py's argparse.Namespace of training args."
            )
        info['epoch'] = ckpt.get('epoch')
        info['metric'] = ckpt.get('metric')
    return _torch_read(path, lambda p: load_state_dict(p, use_ema=info['ema'])), info


def _torch_read(path: Path, read: Callable[[str], Any]) -> Any:
    """read(path) with timm's torch.load(weights_only=True), its errors as one-line ValueErrors."""
    try:
        return read(str(path))
    except RuntimeError as e:
        if isinstance(e.__cause__, pickle.UnpicklingError):  # timm's "weights_only=True blocked loading ..."
            raise ValueError(
                f'{path} holds Python objects other than tensors and training args, so it is not loaded: '
                f'torch.load(weights_only=True) refused it ({str(e.__cause__).splitlines()[0]}). Only timm training '
                f'checkpoints, state dicts and .safetensors files are supported.'
            ) from e
        raise ValueError(f'Could not read {path} as a PyTorch checkpoint ({_one_line(e)}). Is it truncated?') from e
    except (EOFError, OSError, ValueError) as e:
        raise ValueError(f'Could not read {path} as a PyTorch checkpoint ({_one_line(e)}). Is it truncated?') from e


def _rebuild(
    state_dict: dict[str, torch.Tensor],
    args: dict[str, Any],
    model_name: str | None,
    model_kwargs: Mapping[str, Any] | None,
    source: Path,
) -> tuple[SmallViT, str]:
    """The model the checkpoint was trained as, with its weights loaded strictly."""
    name = model_name or args.get('model')
    if not name:
        raise ValueError(
            f'{source} does not say which model it holds (no training args): pass --model (model_name=), '
            f"e.g. --model smallvit_nano_patch4_28; timm.list_models('smallvit*') lists them."
        )
    source_args: dict[str, Any] = {}
    if isinstance(name, str) and name.startswith(('hf-hub:', 'local-dir:')):
        name, source_args = _source_architecture(name, source)  # a fine-tuned run: the model it started from
    _check_architecture(name, f'{source} was trained as')
    if 'patch_embed.proj.weight' not in state_dict or 'pos_embed' not in state_dict:
        raise ValueError(
            f'{source} is not a smallvit checkpoint: its weights have no patch_embed.proj / pos_embed '
            f'(first keys: {_head(list(state_dict))}).'
        )
    if not isinstance(args.get('model_kwargs') or {}, Mapping):
        raise ValueError(
            f'{source}: the training arg model_kwargs is {args["model_kwargs"]!r}, not a mapping of model arguments.'
        )
    kwargs = {k: v for k, v in source_args.items() if k not in ('num_classes', 'in_chans')}
    kwargs.update(args.get('model_kwargs') or {})
    kwargs.update(model_kwargs or {})

    # train.py builds 3-channel models unless told otherwise; when the args don't say, the input conv weights do
    first_conv = timm.models.get_pretrained_cfg_value(name, 'first_conv') or 'patch_embed.proj'
    if f'{first_conv}.weight' not in state_dict:
        raise ValueError(
            f'{source} does not hold {name} weights: no {first_conv}.weight (first keys: {_head(list(state_dict))}).'
        )
    weight_chans = state_dict[f'{first_conv}.weight'].shape[1]
    input_size = args.get('input_size') or [None]
    declared = _first(kwargs.pop('in_chans', None), args.get('in_chans'), input_size[0])
    if declared is not None and declared != weight_chans:
        raise ValueError(
            f'in_chans mismatch in {source}: the training args say {declared} input channels, but the input '
            f'conv weights ({first_conv}) take {weight_chans}.'
        )
    head = state_dict.get('head.weight')
    weight_classes = head.shape[0] if head is not None else 0
    declared = _first(kwargs.pop('num_classes', None), args.get('num_classes'))
    if declared is not None and declared != weight_classes:
        raise ValueError(
            f'num_classes mismatch in {source}: the training args say {declared} classes, but the classifier '
            f'(head.weight) has {weight_classes} outputs.'
        )
    global_pool = _first(kwargs.pop('global_pool', None), args.get('gp'))
    if global_pool is not None:
        kwargs['global_pool'] = global_pool
    try:
        model = _as_smallvit(timm.create_model(name, num_classes=weight_classes, in_chans=weight_chans, **kwargs), name)
    except (TypeError, ValueError) as e:
        raise ValueError(f'Could not build {name} with {kwargs}: {e}') from e
    _load_strict(model, state_dict, f'The weights in {source}', name)
    # the default pretrained_cfg describes the shipped weights (their labels, notes, source): not these
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SHIPPED_WEIGHTS_KEYS}
    # and the size the model is built at (model_kwargs img_size), which timm's cfg leaves at the default's
    model.pretrained_cfg['input_size'] = (model.in_chans, *_img_size(model))
    return model.eval(), name


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str, name: str) -> None:
    """Load every tensor of state_dict into model, or say in one line what does not fit (the model is then unusable)."""
    # torch names size mismatches only in its error text, so shapes are compared here; the tensors that fit are
    # loaded, and load_state_dict's result names the missing and unexpected keys
    expected = model.state_dict()
    shapes = {
        k: (tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    }
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in shapes}, strict=False)
    missing = [k for k in result.missing_keys if k not in shapes]
    unexpected = list(result.unexpected_keys)
    if not (missing or unexpected or shapes):
        return
    problems = []
    if shapes:
        problems.append(
            'shapes differ: '
            + ', '.join(f'{k} {got} vs {want} in the model' for k, (got, want) in list(shapes.items())[:4])
        )
    if missing:
        problems.append(f'missing: {_head(missing)}')
    if unexpected:
        problems.append(f'unexpected: {_head(unexpected)}')
    hint = ''
    if 'pos_embed' in shapes or 'patch_embed.proj.weight' in shapes:
        hint = ' The image or patch size differs: give the training img_size (--model-kwargs img_size=N).'
    raise ValueError(
        f'{what} do not fit {name}: {"; ".join(problems)}.{hint} Are they from another model? '
        f'Pass the model they were trained as (--model / model_name).'
    )


def _check_reload(model: SmallViT, folder: Path, source: Path) -> None:
    """Load the export back the way users will and demand the same logits, before it is moved into place."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    chans, (h, w) = model.in_chans, _img_size(model)
    x = torch.randn(2, chans, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        if not bool(torch.isfinite(expected).all()):
            raise ValueError(
                f'{source}: the model gives NaN or inf logits on a random input, so its weights are unusable (did the '
                f'run diverge?). Nothing was exported; export an earlier checkpoint.'
            )
        if not torch.equal(expected, reloaded(x)):
            raise RuntimeError(
                f'The export in {folder} does not reproduce the checkpoint logits (a timm-smallvit bug).'
            )


def read_summary(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a timm summary.csv, one per epoch (the last one wins when a resumed run repeats an epoch)."""
    by_epoch: dict[int, dict[str, float]] = {}
    with Path(path).open(newline='') as f:
        for row in csv.DictReader(f):
            values = {}
            for key, value in row.items():
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    continue  # header lines repeated by a resumed run, empty cells
            if 'epoch' in values and math.isfinite(values['epoch']):
                by_epoch[int(values['epoch'])] = values
    return [by_epoch[e] for e in sorted(by_epoch)]


def _prediction_grid(
    model: SmallViT, args: dict[str, Any], labels: tuple[str, ...] | None, path: Path, title: str
) -> str | None:
    """predictions.png from the run's evaluation images, when they are at hand; returns the card's sentence."""
    from PIL import Image

    from .data import SmallImageDataset
    from .predict import save_prediction_grid

    if not args.get('data_dir'):
        return None
    try:
        data = SmallImageDataset(
            args.get('dataset') or '',
            args['data_dir'],
            train_split=args.get('train_split') or 'train',
            val_split=args.get('val_split') or 'validation',
            class_map=args.get('class_map') or '',
        )
        split = data.load('val', in_chans=model.in_chans, img_size=_img_size(model), progress=False)
        images, targets = split.images, split.labels
    except (OSError, ValueError, RuntimeError) as e:  # another machine, moved data: the export goes on without it
        _logger.info('No prediction grid in the card: the evaluation images are not at hand (%s).', e)
        return None
    mode = 'L' if images.shape[1] == 1 else 'RGB'
    # the first 12 test images, then the first 4 that the model gets wrong among the first 1000
    candidates = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy(), mode) for img in images[:1000]]
    transform = create_transform(**resolve_model_data_config(model))
    with torch.inference_mode():
        preds = torch.cat([model(torch.stack([transform(im) for im in candidates[i : i + 250]])).argmax(-1)
                           for i in range(0, len(candidates), 250)])  # fmt: skip
    wrong = [i for i in range(12, len(candidates)) if preds[i] != targets[i]][:4]
    chosen = list(range(min(12, len(candidates)))) + wrong
    shown, truth = [candidates[i] for i in chosen], [int(targets[i]) for i in chosen]
    right = save_prediction_grid(model, shown, truth, path, title, labels=labels)
    return (
        f'The first {min(12, len(candidates))} images of the test split, then the first {len(wrong)} of the first '
        f'{len(candidates):,} that these weights get wrong ({right:.0%} of those shown are right), each above its '
        'attention rollout (Abnar and Zuidema, 2020).'
    )


def _plot_learning_curve(rows: list[dict[str, float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas, not pyplot: no global backend or figure state
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [int(r['epoch']) for r in rows]
    for key, label in (('train_loss', 'train loss'), ('eval_loss', 'eval loss')):
        if any(key in r for r in rows):
            loss_ax.plot(epochs, [r.get(key, math.nan) for r in rows], marker='o', ms=3, label=label)
    for key, label in (('eval_top1', 'top-1'), ('eval_top5', 'top-5')):
        if any(key in r for r in rows):
            acc_ax.plot(epochs, [r.get(key, math.nan) for r in rows], marker='o', ms=3, label=label)
    loss_ax.set(xlabel='epoch', ylabel='loss', title='loss')
    acc_ax.set(xlabel='epoch', ylabel='accuracy (%)', title='eval accuracy')
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format='png', metadata={'Software': None})


def _model_card(
    model: SmallViT,
    name: str,
    config: dict[str, Any],
    *,
    args: dict[str, Any],
    info: dict[str, Any],
    rows: list[dict[str, float]],
    checkpoint: Path,
    model_ref: str,
    model_name: str,
    dataset: tuple[str | None, str | None],
    curve: str | None,
    grid: str | None = None,
) -> ModelCard:
    hub_dataset, dataset_name = dataset
    cfg = config['pretrained_cfg']
    blocks = _blocks(model)
    h, w = _img_size(model)
    ph, pw = model.patch_embed.patch_size

    split = 'test' if hub_dataset else str(args.get('val_split') or 'validation')
    val_samples, train_samples = _num_samples(args, 'val_num_samples'), _num_samples(args, 'train_num_samples')
    # the Hub's split syntax: the model-index names the images that were evaluated, not the whole split
    evaluated = f'the first {val_samples:,} images of the {split} split' if val_samples else f'the {split} split'
    final, notes = _final_result(rows, args, info, evaluated)
    if val_samples:
        notes.append(
            f'The run was evaluated on {evaluated} only (val_num_samples {val_samples}), so every eval number here '
            f'(and the model-index, split `{split}[:{val_samples}]`) is measured on those images, not the whole split.'
        )
    if train_samples:
        notes.append(
            f'It was trained on the first {train_samples:,} images of the training split only (train_num_samples '
            f'{train_samples}).'
        )
    eval_results = []
    if final is not None and final.get('describes_export'):
        common: dict[str, Any] = dict(
            task_type='image-classification',
            task_name='Image Classification',
            dataset_type=hub_dataset or dataset_name or 'custom',
            dataset_name=dataset_name or 'custom',
            dataset_split=f'{split}[:{val_samples}]' if val_samples else split,
        )
        if 'eval_top1' in final:
            eval_results.append(
                EvalResult(
                    metric_type='accuracy', metric_name='Top-1 accuracy (%)', metric_value=final['eval_top1'], **common
                )
            )
        if 'eval_top5' in final:
            eval_results.append(
                EvalResult(
                    metric_type='top_5_accuracy',
                    metric_name='Top-5 accuracy (%)',
                    metric_value=final['eval_top5'],
                    **common,
                )
            )
    card_data = ModelCardData(
        library_name='timm',
        license=cfg.get('license', 'apache-2.0'),
        tags=['image-classification', 'timm', 'smallvit', 'vision-transformer'],
        pipeline_tag='image-classification',
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    num_classes = model.num_classes
    if info.get('ema'):
        weights_kind = 'the EMA weights (state_dict_ema)'
    elif info.get('epoch') is not None:
        weights_kind = 'the trained weights'
    else:
        weights_kind = 'the weights'
    context = dict(
        title=f'{name} on {dataset_name}' if dataset_name else name,
        architecture=name,
        checkpoint_name=checkpoint.name,
        epoch=info.get('epoch'),
        weights_kind=weights_kind,
        params=f'{sum(p.numel() for p in model.parameters()):,}',
        gmacs=f'{_count_macs(model) / 1e9:.4f}',
        in_chans=model.in_chans,
        img_size=f'{h}×{w}',
        img_width=w,
        img_height=h,
        image_mode='L' if model.in_chans == 1 else 'RGB',
        patch_size=f'{ph}×{pw}',
        num_patches=model.patch_embed.num_patches,
        width=model.embed_dim,
        depth=len(blocks),
        heads=blocks[0].attn.num_heads,
        mlp_hidden=blocks[0].mlp.fc1.weight.shape[0],
        pooling=_describe_pool(model.global_pool),
        num_classes=num_classes,
        label_names=config.get('label_names'),
        dataset_name=dataset_name,
        interpolation=cfg.get('interpolation'),
        crop_pct=cfg.get('crop_pct'),
        mean=_fmt_tuple(cfg.get('mean')),
        std=_fmt_tuple(cfg.get('std')),
        top_k=min(3, num_classes) if num_classes else 1,
        recipe=_recipe(args),
        final=_fmt_row(final) if final else None,
        final_sentence=final.get('sentence') if final else None,
        notes=notes,
        curve_file=curve,
        grid_file=GRID_NAME if grid else None,
        grid_sentence=grid,
        history=[_fmt_row(r) for r in rows],
        timm_version=timm.__version__,
    )
    return _render_card(card_data, context, model_ref)


def _render_card(card_data: ModelCardData, context: Mapping[str, Any], model_ref: str) -> ModelCard:
    """The card the template renders from card_data and context, its usage snippet naming model_ref."""
    # JSON in an HTML comment, which nothing in it can close
    saved = json.dumps(dict(context)).replace('<', '\\u003c').replace('>', '\\u003e')
    return ModelCard.from_template(
        card_data, template_path=str(_template_path()), model_ref=model_ref, card_context=saved, **context
    )


def _render_for(card: ModelCard, text: str, model_ref: str) -> str | None:
    """The card rendered again with model_ref, when text is the template's card for its own saved context.

    None for a card that export did not write as it is (edited by hand, or by a version that kept no context).
    """
    _, found, tail = text.rpartition(_CARD_CONTEXT)
    try:
        context = json.loads(tail.partition(' -->')[0]) if found else None
    except ValueError:
        return None
    if not isinstance(context, dict) or not isinstance(card.data, ModelCardData):
        return None
    # rendered with a placeholder reference, the card must be the text with its reference there (both places)
    slot = f'<model-ref-{uuid.uuid4().hex}>'
    try:
        parts = str(_render_card(card.data, context, slot)).split(slot)
    except (jinja2.TemplateError, TypeError, ValueError):  # values the installed template cannot render
        return None
    if len(parts) < 2 or not text.startswith(parts[0]):
        return None
    end = text.find(parts[1], len(parts[0]))
    if end < 0 or text[len(parts[0]) : end].join(parts) != text:
        return None
    return str(_render_card(card.data, context, model_ref))


def _single_view(row: dict[str, float]) -> dict[str, float]:
    # A run with eval_hflip logged the mean of each image's and its mirror's logits as eval_*, and the weights alone as
    # eval_*_single. The card describes the weights alone (what timm's validate.py reproduces): single-view numbers
    # become eval_*, the flip-TTA ones eval_*_hflip.
    row = dict(row)
    for name in ('loss', 'top1', 'top5'):
        if f'eval_{name}_single' in row:
            row[f'eval_{name}_hflip'] = row.pop(f'eval_{name}')
            row[f'eval_{name}'] = row.pop(f'eval_{name}_single')
    return row


def _num_samples(args: dict[str, Any], key: str) -> int | None:
    """A training arg that limits a split to its first N images, when it is set."""
    value = args.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _final_result(rows: list[dict[str, float]], args: dict[str, Any], info: dict[str, Any], evaluated: str):
    """The summary row of the checkpoint's epoch, whether it measures the exported weights, and notes for the card."""
    notes: list[str] = []
    if not rows:
        return None, notes
    epoch = info.get('epoch')
    row = next((r for r in rows if int(r['epoch']) == epoch), None) if epoch is not None else rows[-1]
    if row is None:
        notes.append(f'summary.csv has no row for epoch {epoch} of this checkpoint; no result is reported for it.')
        return None, notes
    metric, eval_metric = info.get('metric'), args.get('eval_metric') or 'top1'
    logged = row.get(f'eval_{eval_metric}_hflip', row.get(f'eval_{eval_metric}'))  # what the checkpoint recorded
    if (
        metric is not None
        and logged is not None
        and not math.isclose(logged, float(metric), rel_tol=1e-6, abs_tol=1e-9)
    ):
        notes.append(
            f'summary.csv logs {eval_metric} {logged} for epoch {epoch}, but the checkpoint recorded {metric}: the log '
            'is from another run, so no result is reported for these weights.'
        )
        return None, notes
    # timm's train.py logs the EMA model's eval metrics when it keeps an EMA on the device
    ema_logged = bool(args.get('model_ema')) and not args.get('model_ema_force_cpu')
    describes_export = ema_logged == bool(info.get('ema'))
    final: dict[str, Any] = dict(row, describes_export=describes_export)
    which = 'EMA weights' if ema_logged else 'trained weights'
    final['sentence'] = f'Measured during training (summary.csv, {which}) on {evaluated}, epoch {int(row["epoch"])}:'
    if 'eval_top1_hflip' in row:
        notes.append(
            f'The numbers here are single-view. The run also evaluated each image with its mirror (eval_hflip: the '
            f'mean of the two logits): top-1 {row["eval_top1_hflip"]:.2f}% at epoch {int(row["epoch"])}.'
        )
    if not describes_export:
        exported = 'EMA weights' if info.get('ema') else 'trained (non-EMA) weights'
        notes.append(
            f'These metrics were measured on the {which}, while this export holds the {exported}; '
            'they are left out of the model-index.'
        )
        _logger.warning(
            'summary.csv measured the %s, but the export holds the %s: the card reports no eval results. '
            'Export with%s --ema for the weights that were measured.',
            which,
            exported,
            '' if ema_logged else 'out',
        )
    return final, notes


def _count_macs(model: SmallViT) -> int:
    """Multiply-accumulates of one forward pass at the model's input size (FLOPs / 2)."""
    x = torch.zeros(1, model.in_chans, *_img_size(model))
    # FlopCounterMode does not see inside the CPU SDPA kernel; the explicit attention path is the same math
    with explicit_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        # FlopCounterMode's module hooks make forward run the full last block; count what forward runs unhooked
        model.forward_head(model._forward_class_token(x)) if model._trims() else model(x)
    return counter.get_total_flops() // 2


def _recipe(args: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, label in _RECIPE_KEYS:
        value = args.get(key)
        if value is None or value == '' or (key.startswith('model_ema_') and not args.get('model_ema')):
            continue
        if key == 'amp_dtype' and not args.get('amp'):
            continue
        out.append((label, f'`{value}`' if isinstance(value, str) else _fmt_value(value)))
    if args and args.get('model_kwargs'):
        out.append(('model kwargs', ', '.join(f'`{k}={v}`' for k, v in args['model_kwargs'].items())))
    return out


def _describe_pool(pool: str) -> str:
    return {
        'token': 'class token',
        'avg': 'mean of patch tokens',
        'max': 'max over patch tokens',
        'avgmax': 'mean + max of patch tokens',
        '': 'none (token features)',
    }.get(pool, pool)


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, (list, tuple)):
        return _fmt_tuple(value)
    return str(value)


def _fmt_tuple(value: Any) -> str:
    if value is None:
        return '-'
    return '(' + ', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value) + ')'


def _fmt_metric(row: Mapping[str, float], key: str, fmt: str) -> str:
    value = row.get(key)
    return '-' if value is None or not math.isfinite(value) else format(value, fmt)


def _fmt_row(row: Mapping[str, float]) -> dict[str, str]:
    return dict(
        epoch=str(int(row['epoch'])),
        train_loss=_fmt_metric(row, 'train_loss', '.4f'),
        eval_loss=_fmt_metric(row, 'eval_loss', '.4f'),
        top1=_fmt_metric(row, 'eval_top1', '.2f'),
        top5=_fmt_metric(row, 'eval_top5', '.2f'),
        lr=_fmt_metric(row, 'lr', '.3g'),
    )


def _labels(args: dict[str, Any], num_classes: int) -> tuple[str, ...] | None:
    """The class names the run trained on (its label_names), else those of the dataset it names, if num_classes."""
    labels = args.get('label_names')
    if not (isinstance(labels, (list, tuple)) and all(isinstance(n, str) for n in labels)):
        labels = _DATASETS.get(_dataset_key(args.get('dataset')), (None, None, None))[2]
    return tuple(labels) if labels is not None and len(labels) == num_classes else None


def _folder_name(args: dict[str, Any]) -> str | None:
    """An image folder's name, as the card names the dataset of a run on one."""
    data_dir = args.get('data_dir')
    return Path(data_dir).resolve().name if not args.get('dataset') and isinstance(data_dir, str) else None


def _data_config(args: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing the training args set (mean, std, interpolation, crop_pct, input size)."""
    return {k: args[k] for k in _DATA_KEYS if args.get(k) not in (None, '', [])}


def _dataset_key(dataset: Any) -> str:
    if not isinstance(dataset, str):
        return ''
    return re.sub(r'[^a-z0-9]', '', dataset.lower().rstrip('/').rsplit('/', 1)[-1])


def _template_path() -> Path:
    here = Path(__file__).resolve().parent
    # wheels carry the templates inside the package; a source checkout has them at the top level
    for folder in (here / 'model_cards', here.parent / 'model_cards'):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(f'Model card template {TEMPLATE_NAME} not found beside {here}: reinstall timm-smallvit.')


# ---- checks shared by push and pull ------------------------------------------------------------------------------


def _source_architecture(name: str, source: Path) -> tuple[str, dict[str, Any]]:
    """The architecture and model args of a run's ``hf-hub:`` / ``local-dir:`` model, from its config.json."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path  # timm's only reader

    prefix, _, where = name.partition(':')
    try:
        if prefix == 'local-dir':
            _, architecture, model_args = load_model_config_from_path(where)
        else:
            _, architecture, model_args = load_model_config_from_hf(where)
    except Exception as e:  # a moved folder, no Hub cache offline
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f'{source} was fine-tuned from {name}, whose config.json is not at hand ({first}): pass --model with '
            'its architecture (and --set img_size=N if it differs), e.g. --model smallvit_tiny_convstem_28.'
        ) from e
    return architecture, dict(model_args or {})


def _check_architecture(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name.startswith('smallvit') or not timm.is_model(name):
        raise ValueError(
            f'{what} {name!r}, which is not a smallvit model (one of {", ".join(timm.list_models("smallvit*"))}). '
            f'timm-smallvit exports and checks smallvit models only; load other timm models with timm.create_model.'
        )


def _check_files(config_path: Path, weights_path: Path, where: str) -> dict[str, Any]:
    """Check that config.json and model.safetensors describe one smallvit model timm can load; returns the config."""
    config, state_dict = _read_export(config_path, weights_path, where)
    _check_weights(config, state_dict, where)
    return config


def _read_export(config_path: Path, weights_path: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the tensors of model.safetensors, checked as far as they go without building the model."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'{where}: config.json is not readable JSON ({e}). Export the model again.') from e
    if not isinstance(config, dict):
        raise ValueError(f'{where}: config.json is not a timm model config. Export the model again.')
    _check_architecture(config.get('architecture'), f'{where}: config.json describes architecture')
    # timm reads these with .get/.update: anything but a JSON object would end in an AttributeError there
    for key in ('model_args', 'pretrained_cfg'):
        if key in config and not isinstance(config[key], dict):
            raise ValueError(
                f'{where}: config.json has {key}: {json.dumps(config[key])}, where timm expects a JSON object '
                f'({{...}}). Export the model again.'
            )
    model_args = dict(config.get('model_args', {}))
    num_classes = config.get('num_classes', model_args.get('num_classes'))
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)):
        raise ValueError(
            f'{where}: config.json has num_classes: {json.dumps(num_classes)}, where an integer is expected. '
            f'Export the model again.'
        )
    if model_args.get('num_classes', num_classes) != num_classes:
        raise ValueError(
            f'{where}: num_classes mismatch in config.json: {num_classes} at the top, '
            f'{model_args["num_classes"]} in model_args. Export the model again.'
        )
    try:
        state_dict = safetensors.torch.load_file(weights_path)  # as timm reads an export: the tensors as they are
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError on bad files
        raise ValueError(f'{where}: model.safetensors is corrupt or truncated ({e}). Export the model again.') from e
    head = state_dict.get('head.weight')
    weight_classes = head.shape[0] if head is not None else 0
    if num_classes is not None and num_classes != weight_classes:
        raise ValueError(
            f'{where}: num_classes mismatch: config.json says {num_classes} classes, but the classifier in '
            f'model.safetensors (head.weight) has {weight_classes} outputs. Export the model again.'
        )
    return config, state_dict


def _check_weights(config: dict[str, Any], state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Build the model a checked config.json (_read_export) describes and load state_dict into it strictly."""
    model_args = dict(config.get('model_args', {}))
    num_classes = config.get('num_classes', model_args.get('num_classes'))
    try:
        if num_classes is not None:
            model_args['num_classes'] = num_classes
        model = timm.create_model(config['architecture'], **model_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: config.json model_args do not build {config["architecture"]}: {e}') from e
    _load_strict(model, state_dict, f'{where}: the weights in model.safetensors', config['architecture'])


def _export_files(folder: Path) -> tuple[Path, list[str], list[str]]:
    """The folder's real path, the export files it holds, and its other entries; refuses symbolic links.

    The folder itself may be a link (resolved once); the files in it are taken only as regular files, so that
    nothing outside the folder (a token file, /etc/passwd) is ever read or uploaded through a link.
    """
    if not folder.is_dir():
        raise NotADirectoryError(f'{folder} is not a folder: give the OUT_DIR written by `smallvit export`.')
    real = folder.resolve()
    names, others = [], []
    with os.scandir(real) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name not in EXPORT_FILES:
                others.append(entry.name)
            elif entry.is_symlink():
                raise ValueError(
                    f'{folder / entry.name} is a symbolic link: only regular files are read or pushed, never what a '
                    f'link points to. Replace it with the file itself (or remove it).'
                )
            elif not entry.is_file(follow_symlinks=False):
                raise ValueError(f'{folder / entry.name} is not a regular file: remove it, or export again.')
            else:
                names.append(entry.name)
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if n not in names]
    if missing:
        raise FileNotFoundError(
            f'{folder} has no {" or ".join(missing)}: give a folder written by `smallvit export` (timm loads '
            f'model.safetensors and config.json).'
        )
    return real, names, others


# ---- push ----------------------------------------------------------------------------------------------------------


def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload an exported folder to a Hub model repo (created if needed), as one commit.

    Only the files export writes go up (model.safetensors, config.json, README.md, learning_curve.png), as regular
    files: a symbolic link among them is refused, and nothing else in the folder is sent. Everything is checked
    before the first change on the Hub (the files, the card's metadata, the token, that the endpoint answers), and
    the commit removes the files an earlier push left on the branch that the folder no longer has. The uploaded card
    is rendered again from the template with ``repo_id`` (and the branch) in its usage snippet, from the values
    export kept in it; a card edited after export goes up as it is. out_dir itself is not changed.
    The endpoint is huggingface_hub's (HF_ENDPOINT); the token is never written, printed or logged.

    Args:
        out_dir: Folder written by export_checkpoint.
        repo_id: 'user/name' (or 'org/name') of the model repo.
        private: Create the repo private. An existing public repo is refused rather than pushed to.
        revision: Branch to commit to (created from main if missing); default main.
        commit_message: Commit title; default 'Upload <architecture> (timm-smallvit)'.
        token: Hub token; default HF_TOKEN or the stored `hf auth login` token.

    Returns:
        The commit: a str (its URL) with .oid and .commit_url.
    """
    folder = Path(out_dir)
    if repo_id.count('/') != 1:
        raise ValueError(f"repo_id {repo_id!r} must be 'user/name' or 'org/name' (the namespace names the owner).")
    validate_repo_id(repo_id)  # a ValueError that says which characters are allowed
    branch = revision if revision and revision != 'main' else None
    with tempfile.TemporaryDirectory(prefix='smallvit-push-') as tmp:
        # the staged copies are what is checked and what is sent
        stage = Path(tmp)
        names = _stage_upload(folder, stage, f'hf-hub:{repo_id}@{branch}' if branch else f'hf-hub:{repo_id}')
        config = _check_files(stage / CONFIG_NAME, stage / WEIGHTS_NAME, str(folder))
        token = token or get_token()
        if not token:
            raise LocalTokenNotFoundError(
                'No Hugging Face token found: log in with `hf auth login` (stored by huggingface_hub) or set '
                'HF_TOKEN to a token with write access, then push again.'
            )
        api = HfApi(token=token)  # endpoint: HF_ENDPOINT, else huggingface.co
        message = commit_message or f'Upload {config["architecture"]} (timm-smallvit)'
        with _hub_errors(api, repo_id):
            api.whoami()  # the endpoint answers and takes the token before anything is created
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.model_info(repo_id)
            if private and not info.private:
                raise PermissionError(
                    f'{repo_id} already exists and is public: nothing was pushed. Make it private on the Hub first, '
                    f'or push without --private.'
                )
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
                info = api.model_info(repo_id, revision=branch)
            remote = [sibling.rfilename for sibling in info.siblings or []]
            stale = [path for path in remote if _pushed_before(path) and path not in names]
            operations: list[CommitOperationAdd | CommitOperationDelete] = [
                CommitOperationAdd(path_in_repo=n, path_or_fileobj=stage / n) for n in names
            ]
            operations += [CommitOperationDelete(path_in_repo=n) for n in stale]
            # parent_commit: the stale files were listed at this commit, so nobody else's may land in between
            commit = api.create_commit(
                repo_id, operations, commit_message=message, revision=branch, parent_commit=info.sha
            )
    _logger.info('Pushed %s to %s', folder, commit.commit_url)
    return commit


def _pushed_before(path: str) -> bool:
    # what this or an older push (which sent any *.png) may have uploaded; files in subfolders are someone else's
    return '/' not in path and (path in EXPORT_FILES or path.endswith('.png'))


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's auth and connection errors into one-line PermissionError / ConnectionError messages."""
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise PermissionError(
                f'{api.endpoint} rejected the token (401 Unauthorized) while pushing to {repo_id}: set HF_TOKEN '
                f'to a valid token with write access, or log in again with `hf auth login`.'
            ) from e
        if status == 403:
            raise PermissionError(
                f'The token has no write access to {repo_id} on {api.endpoint} (403 Forbidden): push to a '
                f'namespace you own, or use a token with write access to it.'
            ) from e
        raise
    except _connection_errors() as e:
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise ConnectionError(
            f'Could not reach the Hub at {api.endpoint} ({reason}) while pushing to {repo_id}: check HF_ENDPOINT '
            f'and the network connection, then push again.'
        ) from e


def _connection_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client raises its own transport errors: httpx2 (2.x), httpx (1.x), requests (0.x)
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (('httpx2', 'TransportError'), ('httpx', 'TransportError'), ('requests', 'RequestException')):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _stage_upload(folder: Path, stage: Path, model_ref: str) -> list[str]:
    """Copy the export files into stage, as regular files only; the card is rendered again to name model_ref."""
    real, names, others = _export_files(folder)
    for name in names:
        _copy_regular(real / name, stage / name, folder / name)
    for png in (CURVE_NAME, GRID_NAME):
        if png in names and not (stage / png).read_bytes().startswith(PNG_MAGIC):
            raise ValueError(f'{folder / png} is not a PNG image: remove it, or export again.')
    if CARD_NAME in names:
        path = stage / CARD_NAME
        try:
            text = path.read_text(encoding='utf-8')
        except UnicodeDecodeError as e:
            raise ValueError(f'{folder / CARD_NAME} is not UTF-8 text ({e}): fix it, or export again.') from e
        try:
            card = ModelCard(text)  # the Hub's own parse of the metadata block
        except (yaml.YAMLError, ValueError, TypeError, KeyError) as e:
            reason = ' '.join(str(e).split())
            raise ValueError(
                f'{folder / CARD_NAME}: the card metadata (the YAML front matter between the --- lines) is invalid '
                f'({reason}). Fix it, or export again; nothing was pushed.'
            ) from e
        rendered = _render_for(card, text, model_ref)
        if rendered is None:
            _logger.warning(
                '%s is not the card export wrote (edited since, or by an older timm-smallvit): it goes up as it is, '
                'its usage snippet not rendered again for %s.',
                folder / CARD_NAME,
                model_ref,
            )
        path.write_text(text if rendered is None else rendered, encoding='utf-8')
    if others:
        _logger.warning('Not uploading %s: only %s go up.', others, ', '.join(EXPORT_FILES))
    return names


def _copy_regular(src: Path, dst: Path, shown: Path) -> None:
    # O_NOFOLLOW + fstat: what is copied is the regular file that was checked, even if the name changed since
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
    except OSError as e:
        if src.is_symlink():
            raise ValueError(f'{shown} is a symbolic link: only regular files are pushed.') from e
        raise
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f'{shown} is not a regular file: remove it, or export again.')
        with dst.open('wb') as out:
            shutil.copyfileobj(f, out)


# ---- pull ----------------------------------------------------------------------------------------------------------


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm.create_model, with the smallvit family registered and exported files checked first.

    ``timm.create_model('hf-hub:user/name', pretrained=True)`` works after ``import timm_smallvit``; this does the
    same in one call. For 'hf-hub:' and 'local-dir:' names with pretrained=True it first checks config.json and
    model.safetensors (architecture, num_classes, corrupt or truncated weights), then builds the model once, through
    timm; when timm cannot load the export it says what does not fit (missing, unexpected or mis-shaped weights),
    and without kwargs it demands that the model holds model.safetensors exactly (nothing resampled or dropped).

    Args:
        model_name: A smallvit name, 'hf-hub:user/name[@revision]', or 'local-dir:/path/to/export'.
        pretrained: Load the weights.
        **kwargs: Passed to timm.create_model (num_classes, in_chans, img_size, global_pool, ...).
    """
    if not pretrained or not model_name.startswith(('local-dir:', 'hf-hub:')):
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if model_name.startswith('local-dir:'):
        folder = Path(model_name[len('local-dir:') :])
        real, _, _ = _export_files(folder)
        config_path, weights_path, where = real / CONFIG_NAME, real / WEIGHTS_NAME, str(folder)
    else:
        repo_id, revision = hf_split(model_name[len('hf-hub:') :])
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision))
        weights_path = Path(hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision))
        where = model_name
    config, state_dict = _read_export(config_path, weights_path, where)
    try:
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception:
        # a broken export: the model config.json describes says which weights do not fit, in one line
        _check_weights(config, state_dict, where)
        raise
    if not kwargs:  # no adaptation asked for: the weights timm loaded must be model.safetensors as it is
        _load_strict(model, state_dict, f'{where}: the weights in model.safetensors', config['architecture'])
    return model


# ---- small helpers -------------------------------------------------------------------------------------------------


def _as_smallvit(model: nn.Module, name: str) -> SmallViT:
    # timm.create_model is typed to return nn.Module; every smallvit* name builds a SmallViT
    if not isinstance(model, SmallViT):
        raise TypeError(f'{name} built a {type(model).__name__}, not a SmallViT: is it a smallvit model?')
    return model


def _img_size(model: SmallViT) -> tuple[int, int]:
    """The input size the model was built for (its patch embedding's img_size)."""
    img_size = model.patch_embed.img_size
    if img_size is None:
        raise ValueError(f'{type(model).__name__} was built without an img_size: give one (img_size=N).')
    return img_size


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _one_line(e: BaseException) -> str:
    return ' '.join(str(e).split()) or type(e).__name__


def _head(names: list[str], n: int = 4) -> str:
    return ', '.join(names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')
