"""Export a smallvit training checkpoint as a folder that timm loads and the Hub shows.

    export_checkpoint   timm training checkpoint (or .safetensors) -> model.safetensors, config.json (timm's own
                        save_for_hf), README.md (the model card), learning_curve.png and predictions.png

The folder is written beside its destination under a temporary name and renamed into place at the end, so an
interrupted export leaves no half-written folder; the next export into the same parent removes what a killed one
left. This module owns the names of the export's files (WEIGHTS_NAME, CONFIG_NAME, ... EXPORT_FILES).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.models import save_for_hf

from ._files import disk_full_error, is_disk_full, remove_stale_folders
from .card import read_summary, render_model_card, single_view
from .checkpoint import (
    check_finite,
    data_config_from_args,
    labels_from_args,
    model_img_size,
    read_checkpoint,
    rebuild_model,
)
from .data import SmallImageDataset
from .plots import plot_learning_curve, save_prediction_grid
from .smallvit import SmallViT

__all__ = [
    'CARD_NAME',
    'CONFIG_NAME',
    'CURVE_NAME',
    'EXPORT_FILES',
    'GRID_NAME',
    'ONNX_NAME',
    'WEIGHTS_NAME',
    'export_checkpoint',
]

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
CURVE_NAME = 'learning_curve.png'
GRID_NAME = 'predictions.png'
# everything export writes, and everything push uploads
ONNX_NAME = 'model.onnx'  # with --onnx
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, CURVE_NAME, GRID_NAME, ONNX_NAME)
# an export in progress (or killed) lives in .<out name>.export-<pid>-<random> beside the out folder
_TMP_NAME = re.compile(r'\..+\.export-(?:(?P<pid>\d+)-[a-z0-9_]{8}|[a-z0-9_]{8})')
_STALE_AFTER_S = 15 * 60  # a temp folder without a pid (older versions) is left alone for this long
# what such a folder may hold: the export's files, and the temporary names they are written under (write_atomically's
# .<name>.<8 random characters>, left by a kill while model.onnx was copied in)
_TMP_FILES = re.compile(r'(?P<name>{0})|\.(?:{0})\.[a-z0-9_]{{8}}'.format('|'.join(map(re.escape, EXPORT_FILES))))


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
    write_onnx: Callable[[torch.nn.Module, Path], Any] | None = None,
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
        write_onnx: ``write_onnx(model, path)`` writes the model as ONNX_NAME into the folder before it moves into
            place (``smallvit export --onnx`` passes ``onnx_export.export_onnx``, which sits above this module).

    Returns:
        The written folder.
    """
    checkpoint = Path(checkpoint)
    out = Path(out_dir)
    summary_path = Path(summary) if summary is not None else checkpoint.parent / 'summary.csv'
    _check_out_dir(out, overwrite, inputs=[checkpoint, summary_path])
    state_dict, info = read_checkpoint(checkpoint, use_ema)
    check_finite(state_dict, checkpoint, use_ema)
    model, name = rebuild_model(state_dict, info['args'], model_name, model_kwargs, source=checkpoint)
    rows = read_summary(summary_path) if summary_path.is_file() else []
    if summary is not None and not rows:
        raise ValueError(f'{summary_path} has no epoch rows: pass the summary.csv that timm wrote for this run.')
    if info['args'].get('eval_hflip'):
        rows = [single_view(row) for row in rows]

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_exports(out.parent)
    # the pid in the name tells a killed export's folder from one in progress
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.export-{os.getpid()}-', dir=out.parent))
    try:
        _write_export(
            tmp,
            model,
            name,
            checkpoint,
            info,
            rows,
            model_ref=f'hf-hub:{repo_id}' if repo_id else f'local-dir:{out}',
            model_name=repo_id.split('/')[-1] if repo_id else name,
            write_onnx=write_onnx,
        )
        # mkdtemp and safetensors create private files; an export is an ordinary, shareable folder
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        _move_into_place(tmp, out, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):  # torch and safetensors hide the errno in their own errors, or a C++ trace
            need = sum(t.numel() * t.element_size() for t in state_dict.values()) + (1 << 20)  # + card, figures
            raise disk_full_error(out, need, 'the export') from None
        raise
    _logger.info('Exported %s (%s) to %s', checkpoint, name, out)
    return out


def _write_export(
    folder: Path,
    model: SmallViT,
    name: str,
    checkpoint: Path,
    info: dict[str, Any],
    rows: list[dict[str, float]],
    *,
    model_ref: str,
    model_name: str,
    write_onnx: Callable[[torch.nn.Module, Path], Any] | None = None,
) -> None:
    """The export's files in folder: weights and config (checked by loading them back), figures, then the card."""
    args = info['args']
    # checked as every reader checks them: nothing is written that predict or a pull would refuse
    labels = labels_from_args(args, model.num_classes, source=str(checkpoint))
    model_config: dict[str, Any] = {'label_names': list(labels)} if labels else {}
    data_config = data_config_from_args(args, source=str(checkpoint), in_chans=model.in_chans)
    # transformers' pipeline hands every image over as RGB: a grayscale model turns it into luma, as predict does
    model_args = {'gray_from_rgb': True} if model.in_chans == 1 else None
    try:
        save_for_hf(
            model,
            str(folder),
            model_config=model_config,
            model_args=model_args,
            safe_serialization=True,
            data_config=data_config,
        )
    except ValueError as e:
        raise ValueError(f'The training args of {checkpoint} do not fit the model: {e}') from e
    _drop_model_args_num_classes(folder / CONFIG_NAME)
    reloaded = _check_reload(model, folder, checkpoint)
    if rows:
        plot_learning_curve(rows, folder / CURVE_NAME, title=name)
    grid = _prediction_grid(model, args, labels, folder / GRID_NAME, title=name)
    if write_onnx is not None:  # the model as config.json describes it: its preprocessing and labels go in the file
        write_onnx(reloaded, folder / ONNX_NAME)
    card = render_model_card(
        model,
        name,
        json.loads((folder / CONFIG_NAME).read_text()),
        args=args,
        info=info,
        rows=rows,
        checkpoint=checkpoint,
        model_ref=model_ref,
        model_name=model_name,
        curve_file=CURVE_NAME if rows else None,
        grid_file=GRID_NAME if grid else None,
        grid_sentence=grid,
        onnx_file=ONNX_NAME if write_onnx is not None else None,
    )
    card.save(folder / CARD_NAME)


def _drop_model_args_num_classes(path: Path) -> None:
    # timm's save_for_hf writes num_classes at the top level and in model_args. transformers' TimmWrapper passes
    # num_classes itself, then model_args: the duplicate fails there ("got multiple values for keyword argument
    # 'num_classes'"). timm reads the top-level one (into pretrained_cfg, the model's default), so nothing is lost.
    config = json.loads(path.read_text())
    if config.get('model_args', {}).pop('num_classes', None) is not None:
        path.write_text(json.dumps(config, indent=2))


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
    remove_stale_folders(parent, _TMP_NAME, _TMP_FILES, _STALE_AFTER_S)


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


def _check_reload(model: SmallViT, folder: Path, source: Path) -> torch.nn.Module:
    """Load the export back the way users will and demand the same logits, before it is moved into place: the
    reloaded model, whose pretrained_cfg is config.json's."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    chans, (h, w) = model.in_chans, model_img_size(model)
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
    return reloaded


def _prediction_grid(
    model: SmallViT, args: dict[str, Any], labels: tuple[str, ...] | None, path: Path, title: str
) -> str | None:
    """predictions.png from the run's evaluation images, when they are at hand; returns the card's sentence."""
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
        split = data.load('val', in_chans=model.in_chans, img_size=model_img_size(model), progress=False)
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
