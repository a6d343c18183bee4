"""A training checkpoint (or a bare weights file) -> the smallvit model it holds, checked.

    read_checkpoint         the weights (EMA or trained) and what the checkpoint says besides them (train.py's args,
                            epoch, metric), read by timm with ``torch.load(weights_only=True)`` or safetensors
    rebuild_model           the model the checkpoint was trained as, from its own training args, loaded strictly
    load_strict             every tensor of a state dict into a model, or one line naming what does not fit
    model_from_checkpoint   both, for prediction: the eval-mode model with the run's labels and preprocessing

Nothing else is unpickled: ``torch.load(weights_only=True)`` allows only the ``argparse.Namespace`` that timm's
train.py stores under 'args'. Every record of the checkpoint's zip is read against its CRC-32 first (torch.load does
not check it), and the labels and preprocessing in its args go through :mod:`timm_smallvit.preprocess`.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import load_state_dict
from timm.utils import load_checkpoint_metadata

from ._files import check_zip
from .data import FASHION_MNIST_CLASSES
from .preprocess import check_data_config, check_label_names
from .smallvit import SmallViT

__all__ = [
    'as_smallvit',
    'check_architecture',
    'check_finite',
    'data_config_from_args',
    'dataset_info',
    'labels_from_args',
    'load_strict',
    'model_from_checkpoint',
    'model_img_size',
    'read_checkpoint',
    'rebuild_model',
]

# normalized dataset name -> (Hub dataset id, display name, class names)
_DATASETS: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    'fashionmnist': ('zalando-datasets/fashion_mnist', 'Fashion-MNIST', FASHION_MNIST_CLASSES),
    'mnist': ('ylecun/mnist', 'MNIST', None),
    'cifar10': ('uoft-cs/cifar10', 'CIFAR-10', None),
    'cifar100': ('uoft-cs/cifar100', 'CIFAR-100', None),
}
_SHIPPED_WEIGHTS_KEYS = ('tag', 'file', 'url', 'hf_hub_id', 'label_names', 'label_descriptions', 'description',
                         'origin_url', 'notes', 'paper_name', 'paper_ids')  # fmt: skip
_DATA_KEYS = ('mean', 'std', 'interpolation', 'crop_pct', 'crop_mode', 'input_size', 'img_size', 'in_chans')


def model_from_checkpoint(path: Path) -> SmallViT:
    """The eval-mode model of a training checkpoint, its EMA weights when it has them, preprocessing as trained.

    Its pretrained_cfg gets the run's label_names (when known) and the data config of its training args.

    Args:
        path: A timm training checkpoint, or a .safetensors / plain state-dict file of a smallvit model.
    """
    # the EMA weights, when there are any, are what the trainer evaluated
    state_dict, info = read_checkpoint(path, use_ema=True, ema_required=False)
    model, _ = rebuild_model(state_dict, info['args'], None, None, source=path)
    labels = labels_from_args(info['args'], model.num_classes, source=str(path))
    if labels:
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=labels)
    data_config = data_config_from_args(info['args'], source=str(path), in_chans=model.in_chans)
    if data_config:  # preprocess as the run was trained
        model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()})
    return model.eval()


def read_checkpoint(
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

    check_zip(path)  # a flipped byte in the tensors would load silently: torch.load does not check the CRC
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


def rebuild_model(
    state_dict: dict[str, torch.Tensor],
    args: dict[str, Any],
    model_name: str | None,
    model_kwargs: Mapping[str, Any] | None,
    source: Path,
) -> tuple[SmallViT, str]:
    """The model the checkpoint was trained as, in eval mode with its weights loaded strictly, and its name.

    Args:
        state_dict: The checkpoint's weights.
        args: Its training args (train.py's dests); {} for a bare weights file.
        model_name: The model to build instead of args['model'].
        model_kwargs: Model arguments on top of args['model_kwargs'] (e.g. img_size).
        source: The checkpoint file, named in messages.
    """
    name = model_name or args.get('model')
    if not name:
        raise ValueError(
            f'{source} does not say which model it holds (no training args): pass --model (model_name=), '
            f"e.g. --model smallvit_nano_patch4_28; timm.list_models('smallvit*') lists them."
        )
    source_args: dict[str, Any] = {}
    if isinstance(name, str) and name.startswith(('hf-hub:', 'local-dir:')):
        name, source_args = _source_architecture(name, source)  # a fine-tuned run: the model it started from
    check_architecture(name, f'{source} was trained as')
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
        model = as_smallvit(timm.create_model(name, num_classes=weight_classes, in_chans=weight_chans, **kwargs), name)
    except (TypeError, ValueError) as e:
        raise ValueError(f'Could not build {name} with {kwargs}: {e}') from e
    load_strict(model, state_dict, f'The weights in {source}', name)
    # the default pretrained_cfg describes the shipped weights (their labels, notes, source): not these
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SHIPPED_WEIGHTS_KEYS}
    # and the size the model is built at (model_kwargs img_size), which timm's cfg leaves at the default's
    model.pretrained_cfg['input_size'] = (model.in_chans, *model_img_size(model))
    return model.eval(), name


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str, name: str) -> None:
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


def check_finite(state_dict: dict[str, torch.Tensor], checkpoint: Path, use_ema: bool) -> None:
    """Refuse weights with NaN or inf (a diverged run), naming the first tensors that have them."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        which = 'EMA weights' if use_ema else 'weights'
        raise ValueError(
            f'{checkpoint} has non-finite {which} (NaN or inf) in {_head(bad, 3)}: the run diverged. Nothing was '
            f'exported; export an earlier checkpoint (checkpoint-N.pth.tar from before the loss became NaN).'
        )


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


def check_architecture(name: Any, what: str) -> None:
    """Refuse a name that is not a registered smallvit model; ``what`` starts the message (it names the source)."""
    if not isinstance(name, str) or not name.startswith('smallvit') or not timm.is_model(name):
        raise ValueError(
            f'{what} {name!r}, which is not a smallvit model (one of {", ".join(timm.list_models("smallvit*"))}). '
            f'timm-smallvit exports and checks smallvit models only; load other timm models with timm.create_model.'
        )


def labels_from_args(
    args: dict[str, Any], num_classes: int, source: str = 'the training args'
) -> tuple[str, ...] | None:
    """The class names the run trained on (its label_names, checked), else those of the dataset it names, if
    num_classes.

    Args:
        args: The training args.
        num_classes: The model's classes.
        source: What the args were read from (a checkpoint), named in errors.
    """
    labels = args.get('label_names')
    if labels is not None:
        return tuple(check_label_names(labels, source=f'{source}: training args', num_classes=num_classes) or ())
    labels = dataset_info(args.get('dataset'))[2]
    return tuple(labels) if labels is not None and len(labels) == num_classes else None


def data_config_from_args(
    args: dict[str, Any], source: str = 'the training args', in_chans: int | None = None
) -> dict[str, Any]:
    """The preprocessing the training args set (mean, std, interpolation, crop_pct, input size), checked.

    Args:
        args: The training args.
        source: What they were read from (a checkpoint), named in errors.
        in_chans: The model's input channels.
    """
    given = {k: args[k] for k in _DATA_KEYS if args.get(k) not in (None, '', [])}
    return check_data_config(given, source=f'{source}: training args', in_chans=in_chans)


def dataset_info(dataset: Any) -> tuple[str | None, str | None, tuple[str, ...] | None]:
    """(Hub dataset id, display name, class names) of a dataset timm-smallvit knows by name, else Nones.

    Args:
        dataset: A training arg ``dataset`` (``torch/fashion_mnist``, ``hfds/zalando-datasets/fashion_mnist``, ...).
    """
    return _DATASETS.get(_dataset_key(dataset), (None, None, None))


def _dataset_key(dataset: Any) -> str:
    if not isinstance(dataset, str):
        return ''
    return re.sub(r'[^a-z0-9]', '', dataset.lower().rstrip('/').rsplit('/', 1)[-1])


def as_smallvit(model: nn.Module, name: str) -> SmallViT:
    """The model, typed as the SmallViT it is, or a TypeError naming what ``name`` built instead."""
    # timm.create_model is typed to return nn.Module; every smallvit* name builds a SmallViT
    if not isinstance(model, SmallViT):
        raise TypeError(f'{name} built a {type(model).__name__}, not a SmallViT: is it a smallvit model?')
    return model


def model_img_size(model: SmallViT) -> tuple[int, int]:
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
