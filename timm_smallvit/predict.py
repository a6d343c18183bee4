"""``smallvit predict``: classify image files with any smallvit model and draw what it attends to.

    load_model         a pretrained name (``smallvit_tiny_convstem_28.fmnist``), ``local-dir:``, ``hf-hub:`` or a
                       training checkpoint -> an eval-mode model whose pretrained_cfg says how to preprocess
    find_images        files, folders (recursively) and globs -> image paths
    predict            images -> top-k labels, through timm's own data config and eval transform
    attention_maps     the last block's attention and the attention rollout across blocks (Abnar and Zuidema, 2020),
                       at the patch grid, from timm's ``AttentionExtract``

Preprocessing is the model's own: ``resolve_model_data_config`` + ``create_transform`` on PIL images, so the numbers are
those of ``model(transform(img))``.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from timm.utils.attention_extract import AttentionExtract
from tqdm import tqdm

from ._files import write_atomically
from .data import IMAGE_EXTENSIONS
from .smallvit import SmallViT, explicit_attention

__all__ = ['attention_maps', 'attention_rollout', 'find_images', 'load_model', 'predict']

_logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.safetensors')


def load_model(ref: str) -> SmallViT:
    """The model a reference names, in eval mode, with label_names in its pretrained_cfg when they are known.

    Args:
        ref: A registered name, usually with a pretrained tag (``smallvit_tiny_convstem_28.fmnist``);
            ``local-dir:<folder>`` or ``hf-hub:<repo>`` (an export); or a training checkpoint (``last.pth.tar``,
            ``model_best.pth.tar``, whose EMA weights are used when it has them) or an exported ``.safetensors``.
    """
    from . import hub

    if ref.startswith(('local-dir:', 'hf-hub:')):
        return hub._as_smallvit(hub.create_model(ref, pretrained=True), ref).eval()
    path = Path(ref)
    if path.exists() or ref.endswith(_CHECKPOINT_SUFFIXES):
        if path.is_dir() and (path / hub.CONFIG_NAME).is_file():
            return hub._as_smallvit(hub.create_model(f'local-dir:{path}', pretrained=True), ref).eval()
        if not path.is_file():
            raise FileNotFoundError(f'model {ref}: no such checkpoint file.')
        return _from_checkpoint(path)
    if not timm.is_model(ref.split('.')[0]) or not ref.startswith('smallvit'):
        raise ValueError(
            f'model {ref!r}: not a smallvit name, a local-dir:<folder> or hf-hub:<repo> export, nor a checkpoint file. '
            f'Pretrained names: {", ".join(timm.list_pretrained("smallvit*.*"))}.'
        )
    try:
        model = timm.create_model(ref, pretrained=True)
    except RuntimeError as e:  # timm's "Invalid pretrained tag", "No pretrained weights exist"
        raise ValueError(f'model {ref}: {e}') from e
    return hub._as_smallvit(model, ref).eval()


def _from_checkpoint(path: Path) -> SmallViT:
    from . import hub

    # the EMA weights, when there are any, are what the trainer evaluated
    state_dict, info = hub._read_checkpoint(path, use_ema=True, ema_required=False)
    model, _ = hub._rebuild(state_dict, info['args'], None, None, source=path)
    labels = hub._labels(info['args'], model.num_classes)
    if labels:
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=labels)
    data_config = hub._data_config(info['args'])
    if data_config:  # preprocess as the run was trained
        model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()})
    return model.eval()


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from paths, folders (searched recursively, by image extension) and glob patterns, in order.

    A file named on its own is taken whatever its extension (if it is not an image, predict says so); folders and
    globs contribute files with an image extension (:data:`~timm_smallvit.data.IMAGE_EXTENSIONS`).
    """
    extensions = IMAGE_EXTENSIONS
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                raise FileNotFoundError(f'{path}: no image files in this folder (searched recursively).')
            found.extend(files)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            files = [p for p in files if p.suffix.lower() in extensions]
            if not files:
                raise FileNotFoundError(f'{item}: no image files match this pattern.')
            found.extend(files)
        else:
            raise FileNotFoundError(f'{item}: no such file or folder.')
    return list(dict.fromkeys(found))


def _image_mode(model: SmallViT) -> str:
    return 'L' if model.pretrained_cfg.get('input_size', (3,))[0] == 1 else 'RGB'


def _read(path: Path, mode: str) -> tuple[Image.Image, str]:
    with Image.open(path) as img:
        img.load()
        original = img.mode
        return img.convert(mode), original


def predict(
    model: SmallViT,
    paths: Iterable[Path],
    top_k: int = 5,
    batch_size: int = 64,
    attention_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels (and, with attention_dir, attention figures) for each image.

    Returns one record per image, in order: ``{'file', 'predictions': [{'label', 'index', 'probability'}]}``, or
    ``{'file', 'error'}`` for a file that could not be read as an image (the others are still predicted).
    """
    paths = list(paths)
    mode = _image_mode(model)
    transform = create_transform(**resolve_model_data_config(model))
    labels = model.pretrained_cfg.get('label_names')
    top_k = max(1, min(top_k, model.num_classes))
    if attention_dir is not None:
        model.set_fused_attn(False)  # predict owns the model it loaded: no need to switch back
    extractor = _Attention(model) if attention_dir is not None else None
    out_dir = Path(attention_dir) if attention_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    converted: set[str] = set()
    names: set[str] = set()
    bar = tqdm(total=len(paths), desc='predict', unit='img', disable=progress is False or len(paths) <= batch_size)
    for start in range(0, len(paths), batch_size):
        batch, images, tensors = [], [], []
        for path in paths[start : start + batch_size]:
            try:
                img, original = _read(path, mode)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                records.append({'file': str(path), 'error': _reason(e)})
                continue
            if original not in (mode, 'P', '1') and original not in converted:
                converted.add(original)
                _logger.warning('%s images are converted to %s: the model takes %s.', original, mode, _chans(mode))
            batch.append((len(records), path))
            records.append({'file': str(path)})
            images.append(img)
            tensors.append(transform(img))
        bar.update(min(batch_size, len(paths) - start))
        if not tensors:
            continue
        x = torch.stack(tensors)
        with torch.inference_mode():
            probs = model(x).float().softmax(dim=-1)
        values, indices = probs.topk(top_k, dim=-1)
        for (slot, _), p, i in zip(batch, values.tolist(), indices.tolist(), strict=True):
            records[slot]['predictions'] = [
                {'label': labels[k] if labels else str(k), 'index': k, 'probability': round(v, 6)}
                for v, k in zip(p, i, strict=True)
            ]
        if extractor is not None and out_dir is not None:
            last, rollout = extractor(x)
            for j, (slot, path) in enumerate(batch):
                name = _unique(path.stem, names)
                top = records[slot]['predictions'][0]
                title = f'{path.name}: {top["label"]} ({top["probability"]:.0%})'
                _save_attention_figure(images[j], last[j], rollout[j], out_dir / f'{name}.png', title, extractor)
                records[slot]['attention'] = str(out_dir / f'{name}.png')
    bar.close()
    return records


def _chans(mode: str) -> str:
    return '1 channel (grayscale)' if mode == 'L' else '3 channels (RGB)'


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return 'not an image Pillow can read'
    return ' '.join(str(e).split()) or type(e).__name__


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f'{stem}-{n}'
    taken.add(name)
    return name


# ---- attention -------------------------------------------------------------------------------------------------


def attention_rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema, 2020) over blocks: prod_l (0.5 A_l + 0.5 I), heads averaged.

    Args:
        maps: Each block's attention, (B, heads, N, N), first block first.

    Returns:
        (B, N, N): how much each output token draws on each input token through every block and residual.
    """
    rollout = None
    for attn in maps:
        a = attn.float().mean(dim=1)  # (B, N, N)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError('attention_rollout needs at least one attention map.')
    return rollout


def attention_maps(model: SmallViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the pooled feature attends to, at the patch grid: (last block, rollout), each (B, grid_h, grid_w).

    Class-token models: the class token's row (its attention over the patches); mean-pooled models: the mean of the
    patch tokens' rows. Maps come from timm's ``AttentionExtract`` on the explicit attention path (the model's own
    attention setting is restored afterwards).
    """
    # AttentionExtract reads the explicit path's softmax, as for timm's ViT
    with explicit_attention(model):
        return _Attention(model)(x)


class _Attention:
    # the model must be on the explicit attention path (smallvit.explicit_attention) while this is used
    def __init__(self, model: SmallViT) -> None:
        self.extract = AttentionExtract(model, method='fx')
        self.prefix = model.num_prefix_tokens
        self.pooled_by_token = model.global_pool == 'token'
        self.grid = tuple(model.patch_embed.grid_size)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            maps = list(self.extract(x).values())  # each (B, heads, N, N)
        rollout = attention_rollout(maps)
        last = maps[-1].float().mean(dim=1)
        return self._pooled(last), self._pooled(rollout)

    def _pooled(self, attn: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        rows = attn[:, 0, p:] if self.pooled_by_token else attn[:, p:, p:].mean(dim=1)  # (B, patches)
        return rows.reshape(-1, *self.grid)


def _save_attention_figure(
    image: Image.Image, last: torch.Tensor, rollout: torch.Tensor, path: Path, title: str, extractor: _Attention
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    which = 'class token' if extractor.pooled_by_token else 'mean over tokens'
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _show(axes[0], image)
    axes[0].set_title('image')
    for ax, attn, label in ((axes[1], last, f'last block ({which})'), (axes[2], rollout, 'attention rollout')):
        _show(ax, image)
        _overlay(ax, attn, image.size)
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # room for the title above the panels' own
    _save_png(fig, path)


def _show(ax, image: Image.Image) -> None:
    ax.imshow(image, cmap='gray' if image.mode == 'L' else None, vmin=0, vmax=255)
    ax.set_axis_off()


def _overlay(ax, attn: torch.Tensor, size: tuple[int, int]) -> None:
    # nearest: one cell a patch, the grid the model sees
    a = attn.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp(min=1e-12)
    w, h = size
    up = F.interpolate(a[None, None], size=(h, w), mode='nearest')[0, 0]
    ax.imshow(up.numpy(), cmap='inferno', alpha=0.55, extent=(-0.5, w - 0.5, h - 0.5, -0.5))


def _save_png(fig, path: Path) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, format='png', metadata={'Software': None}))


def save_prediction_grid(
    model: SmallViT,
    images: Sequence[Image.Image],
    targets: Sequence[int],
    path: Path,
    title: str,
    labels: Sequence[str] | None = None,
) -> float:
    """A grid of images with their true and predicted labels (errors in red) above their attention rollouts.

    Labels default to the model's pretrained_cfg label_names. Returns the share of the images predicted right.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    transform = create_transform(**resolve_model_data_config(model))
    labels = labels or model.pretrained_cfg.get('label_names') or [str(i) for i in range(model.num_classes)]
    x = torch.stack([transform(img) for img in images])
    with torch.inference_mode():
        preds = model(x).argmax(dim=-1).tolist()
    _, rollout = attention_maps(model, x)
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(1.6 * cols, 3.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (img, target, pred) in enumerate(zip(images, targets, preds, strict=True)):
        r, c = divmod(i, cols)
        _show(axes[2 * r, c], img)
        wrong = pred != target
        axes[2 * r, c].set_title(
            f'{labels[pred]}\n(true: {labels[target]})' if wrong else labels[pred],
            fontsize=7,
            color='red' if wrong else 'black',
        )
        _show(axes[2 * r + 1, c], img)
        _overlay(axes[2 * r + 1, c], rollout[i], img.size)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    return sum(p == t for p, t in zip(preds, targets, strict=True)) / len(images)
