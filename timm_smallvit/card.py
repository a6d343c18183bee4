"""The model card of an export: README.md, rendered from model_cards/smallvit.md, and the numbers it reports.

    render_model_card   the card of an exported model: architecture, preprocessing, the recipe, the final result
                        (the model-index the Hub shows), the training history, the figures
    render_for          an exported card rendered again for another ``model_ref`` (push names the Hub repo)
    read_summary        the rows of a run's summary.csv, one per epoch

The template ships inside the package in a wheel (``timm_smallvit/model_cards``) and lies at the top level of a source
checkout (``model_cards/``). The card's last line keeps the values it was rendered from, so that push can render it
again with the repo's name in its usage snippet.
"""

from __future__ import annotations

import csv
import html
import importlib.resources
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import dataset_info, model_img_size
from .smallvit import SmallViT, explicit_attention, model_blocks

__all__ = ['TEMPLATE_NAME', 'read_summary', 'render_for', 'render_model_card', 'single_view']

_logger = logging.getLogger(__name__)

TEMPLATE_NAME = 'smallvit.md'
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
    ('val_holdout', 'evaluation images held out from training'),
)
# the card's last line keeps what the template rendered it from (but model_ref), so that push can render it again
_CARD_CONTEXT = '<!-- timm-smallvit card: '


def render_model_card(
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
    curve_file: str | None = None,
    grid_file: str | None = None,
    grid_sentence: str | None = None,
    onnx_file: str | None = None,
) -> ModelCard:
    """The model card of an exported model.

    Args:
        model: The exported model.
        name: Its architecture.
        config: The config.json written for it (timm's save_for_hf).
        args: The run's training args (train.py's dests).
        info: What the checkpoint says besides its weights (``checkpoint.read_checkpoint``).
        rows: The run's summary.csv rows (``read_summary``), single-view (``single_view``).
        checkpoint: The exported checkpoint file.
        model_ref: What the usage snippet loads: ``hf-hub:<repo>`` or ``local-dir:<folder>``.
        model_name: The model-index's model name.
        curve_file: The learning curve's file in the export, if any.
        grid_file: The prediction grid's file in the export, if any.
        grid_sentence: What the prediction grid shows.
        onnx_file: The ONNX file in the export, if any (``smallvit export --onnx``).
    """
    name = split_model_name_tag(name)[0]  # a fine-tuned run of 'x.fmnist' is an x; base_model says where it started
    hub_dataset, known_name, _ = dataset_info(args.get('dataset'))
    dataset_name = known_name or args.get('dataset') or _folder_name(args)
    split = 'test' if hub_dataset else str(args.get('val_split') or 'validation')
    val_samples, train_samples = _num_samples(args, 'val_num_samples'), _num_samples(args, 'train_num_samples')
    holdout = _num_samples(args, 'val_holdout')
    # the Hub's split syntax: the model-index names the images that were evaluated, not the whole split
    evaluated = f'the first {val_samples:,} images of the {split} split' if val_samples else f'the {split} split'
    if holdout:
        split = 'train'  # the Hub's split syntax has no name for a random subset: the note below says which
        evaluated = f'{holdout:,} images held out from the training split'
    final, notes = _final_result(rows, args, info, evaluated)
    if holdout:
        notes.append(
            f'The run was evaluated on {evaluated} (val_holdout {holdout}: a fixed random draw, not trained on), '
            'not on the test split, so every eval number here (and the model-index, split `train`) is measured on '
            'those images.'
        )
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
        eval_results = _eval_results(
            final,
            dataset_type=hub_dataset or dataset_name or 'custom',
            dataset_name=dataset_name or 'custom',
            dataset_split=f'{split}[:{val_samples}]' if val_samples else split,
        )
    card_data = ModelCardData(
        library_name='timm',
        license=config['pretrained_cfg'].get('license', 'apache-2.0'),
        tags=['image-classification', 'timm', 'smallvit', 'vision-transformer'],
        pipeline_tag='image-classification',
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        base_model=_base_model(args),
    )
    shown_dataset = _card_text(dataset_name) if dataset_name else None  # a folder name: anything a user typed
    title = f'{name} on {shown_dataset}' if shown_dataset else name
    context = _model_context(model, name, config, info, title=title, checkpoint=checkpoint, dataset_name=shown_dataset)
    # after the model's values, in the order the card has always saved them (its last line keeps them, as JSON)
    context.update(
        recipe=_recipe(args),
        final=_fmt_row(final) if final else None,
        final_sentence=final.get('sentence') if final else None,
        notes=notes,
        curve_file=curve_file,
        grid_file=grid_file,
        grid_sentence=grid_sentence,
        history=[_fmt_row(r) for r in rows],
        timm_version=timm.__version__,
    )
    if onnx_file:  # only then: the saved context of a card without one stays as it always was
        context['onnx_file'] = onnx_file
    return _render_card(card_data, context, model_ref)


def _eval_results(final: Mapping[str, Any], **dataset: Any) -> list[EvalResult]:
    """The model-index entries of the final result: top-1 and top-5 accuracy, where summary.csv has them."""
    common: dict[str, Any] = dict(task_type='image-classification', task_name='Image Classification', **dataset)
    results = []
    if 'eval_top1' in final:
        results.append(
            EvalResult(
                metric_type='accuracy', metric_name='Top-1 accuracy (%)', metric_value=final['eval_top1'], **common
            )
        )
    if 'eval_top5' in final:
        results.append(
            EvalResult(
                metric_type='top_5_accuracy',
                metric_name='Top-5 accuracy (%)',
                metric_value=final['eval_top5'],
                **common,
            )
        )
    return results


def _model_context(
    model: SmallViT,
    name: str,
    config: dict[str, Any],
    info: dict[str, Any],
    *,
    title: str,
    checkpoint: Path,
    dataset_name: str | None,
) -> dict[str, Any]:
    """What the card says about the model itself: its weights, size, input, shape and preprocessing."""
    cfg = config['pretrained_cfg']
    blocks = model_blocks(model)
    h, w = model_img_size(model)
    ph, pw = model.patch_embed.patch_size
    num_classes = model.num_classes
    if info.get('ema'):
        weights_kind = 'the EMA weights (state_dict_ema)'
    elif info.get('epoch') is not None:
        weights_kind = 'the trained weights'
    else:
        weights_kind = 'the weights'
    return dict(
        title=title,
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
        label_names=[_card_text(n) for n in config['label_names']] if config.get('label_names') else None,
        dataset_name=dataset_name,
        interpolation=cfg.get('interpolation'),
        crop_pct=cfg.get('crop_pct'),
        mean=_fmt_tuple(cfg.get('mean')),
        std=_fmt_tuple(cfg.get('std')),
        top_k=min(3, num_classes) if num_classes else 1,
    )


def _card_text(value: Any) -> str:
    """A name (a class folder's, a dataset folder's) as the card body shows it: one line, no HTML, no Markdown.

    A newline, a `---` line, raw HTML or an unclosed `<!--` in a class name would break or hide the rest of the card.
    """
    text = ''.join(f'\\{c}' if c in '\\`*_[]|' else c for c in html.escape(str(value), quote=False))
    return ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii') for c in text)


def _base_model(args: dict[str, Any]) -> str | None:
    """The Hub repo a fine-tuned run started from (the card's base_model), where it has one."""
    model = args.get('model')
    if not args.get('pretrained') or not isinstance(model, str) or model.startswith('local-dir:'):
        return None  # trained from scratch, or from a file (initial_checkpoint, a local export): no Hub repo
    if model.startswith('hf-hub:'):
        return model[len('hf-hub:') :].split('@')[0]
    cfg = get_pretrained_cfg(model)
    return cfg.hf_hub_id if cfg is not None else None


def _template() -> str:
    # a wheel carries the template inside the package (pyproject's force-include); a source checkout, or an editable
    # install of one, has it at the top level beside the package
    packaged = importlib.resources.files('timm_smallvit') / 'model_cards' / TEMPLATE_NAME
    if packaged.is_file():
        return packaged.read_text(encoding='utf-8')
    checkout = Path(__file__).resolve().parent.parent / 'model_cards' / TEMPLATE_NAME
    if checkout.is_file():
        return checkout.read_text(encoding='utf-8')
    raise FileNotFoundError(f'Model card template {TEMPLATE_NAME} not found in timm_smallvit: reinstall timm-smallvit.')


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


def single_view(row: dict[str, float]) -> dict[str, float]:
    """A summary.csv row with the single-view numbers as eval_* and the flip-TTA ones as eval_*_hflip."""
    # A run with eval_hflip logged the mean of each image's and its mirror's logits as eval_*, and the weights alone as
    # eval_*_single. The card describes the weights alone (what timm's validate.py reproduces): single-view numbers
    # become eval_*, the flip-TTA ones eval_*_hflip.
    row = dict(row)
    for name in ('loss', 'top1', 'top5'):
        if f'eval_{name}_single' in row:
            row[f'eval_{name}_hflip'] = row.pop(f'eval_{name}')
            row[f'eval_{name}'] = row.pop(f'eval_{name}_single')
    return row


def _render_card(card_data: ModelCardData, context: Mapping[str, Any], model_ref: str) -> ModelCard:
    """The card the template renders from card_data and context, its usage snippet naming model_ref."""
    # JSON in an HTML comment, which nothing in it can close
    saved = json.dumps(dict(context)).replace('<', '\\u003c').replace('>', '\\u003e')
    return ModelCard.from_template(
        card_data, template_str=_template(), model_ref=model_ref, card_context=saved, **context
    )


def render_for(card: ModelCard, text: str, model_ref: str) -> str | None:
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
    x = torch.zeros(1, model.in_chans, *model_img_size(model))
    # FlopCounterMode does not see inside the CPU SDPA kernel; the explicit attention path is the same math
    with explicit_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        # FlopCounterMode's module hooks make forward run the full last block; count what forward runs unhooked
        model.forward_head(model.forward_class_token(x)) if model.trims_last_block() else model(x)
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
    return out + _compute(args)


def _compute(args: dict[str, Any]) -> list[tuple[str, str]]:
    """What the run measured of itself (the trainer records it in args.yaml): compute, where it ran, how long."""
    out = []
    tflop, gflop = args.get('train_tflop'), args.get('train_gflop_per_image')
    if isinstance(tflop, (int, float)) and isinstance(gflop, (int, float)):
        teacher = args.get('kd_teacher_tflop')
        before = f", {teacher:g} TFLOP of it the teacher's training" if teacher else ''
        out.append(('training compute', f'{tflop:,.1f} TFLOP ({gflop:.4f} GFLOP per training image{before})'))
    if isinstance(args.get('budget_tflop'), (int, float)) and args['budget_tflop']:
        out.append(('compute budget', f'{args["budget_tflop"]:g} TFLOP'))
    if isinstance(args.get('train_device'), str):
        out.append(('trained on', _card_text(args['train_device'])))
    if isinstance(args.get('train_wall_s'), (int, float)):
        out.append(('training wall time', f'{args["train_wall_s"] / 60:,.1f} min (evaluations included)'))
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


def _folder_name(args: dict[str, Any]) -> str | None:
    """An image folder's name, as the card names the dataset of a run on one."""
    data_dir = args.get('data_dir')
    return Path(data_dir).resolve().name if not args.get('dataset') and isinstance(data_dir, str) else None
