"""Every figure timm-smallvit draws, as PNG files.

    plot_learning_curve     a run's loss and eval accuracy per epoch (the export's learning_curve.png)
    save_prediction_grid    images with their true and predicted labels above their attention rollouts
                            (the export's predictions.png)
    save_attention_figure   one image, its last block's attention and its rollout (``smallvit predict --attention``)
    attention_overlay       one attention map over one image, as the figures draw it, as a PIL image (``smallvit app``)

Figures are drawn on a matplotlib ``Figure`` with its own Agg canvas, not pyplot: no global backend or figure state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from ._files import write_atomically
from .attention import attention_maps
from .smallvit import SmallViT

__all__ = [
    'ATTENTION_OPACITY',
    'attention_overlay',
    'plot_learning_curve',
    'save_attention_figure',
    'save_prediction_grid',
]

ATTENTION_OPACITY = 0.55  # how opaque the attention map is over the image in every figure
ATTENTION_CMAP = 'inferno'


def plot_learning_curve(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss (train, eval) and eval accuracy (top-1, top-5) per epoch, from summary.csv rows, as a PNG file.

    Args:
        rows: One dict per epoch (``card.read_summary``); the curves drawn are those some row has.
        path: The PNG file to write.
        title: The figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def save_attention_figure(
    image: Image.Image, last: torch.Tensor, rollout: torch.Tensor, path: Path, title: str, *, pooled_by_token: bool
) -> None:
    """The image, then its last block's attention and its attention rollout over it, side by side, as a PNG file.

    Args:
        image: The image as it was read.
        last: The last block's attention at the patch grid (grid_h, grid_w).
        rollout: The attention rollout at the patch grid (grid_h, grid_w).
        path: The PNG file to write.
        title: The figure's title.
        pooled_by_token: The model pools its class token (else the mean over tokens): names the last-block panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    which = 'class token' if pooled_by_token else 'mean over tokens'
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


def attention_overlay(
    image: Image.Image, attn: torch.Tensor, opacity: float = ATTENTION_OPACITY, size: tuple[int, int] | None = None
) -> Image.Image:
    """An attention map drawn over an image as the figures draw it, as an RGB image: the map scaled to 0-1, one cell
    a patch (nearest), coloured with inferno, blended over the image with ``opacity``.

    Args:
        image: The image (any mode; 'L' is shown gray).
        attn: The map at the patch grid (grid_h, grid_w).
        opacity: 0 shows the image alone, 1 the map alone.
        size: (width, height) to draw at (default: the image's size); the image is resized with Lanczos.
    """
    from matplotlib import colormaps

    w, h = size or image.size
    base = image.convert('RGB')
    if base.size != (w, h):
        base = base.resize((w, h), Image.Resampling.NEAREST if w >= image.width else Image.Resampling.LANCZOS)
    a = attn.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp(min=1e-12)
    colours = colormaps[ATTENTION_CMAP](a.numpy())[..., :3].astype(np.float32)  # one colour a patch, as imshow's
    gh, gw = a.shape
    # nearest, as F.interpolate(mode='nearest') picks: output pixel i shows cell floor(i * grid / size)
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    up = colours[rows[:, None], cols[None, :]]
    blend = (1 - opacity) * (np.asarray(base, dtype=np.float32) / 255) + opacity * up
    return Image.fromarray(np.round(blend * 255).astype(np.uint8), 'RGB')


def _show(ax: Any, image: Image.Image) -> None:
    ax.imshow(image, cmap='gray' if image.mode == 'L' else None, vmin=0, vmax=255)
    ax.set_axis_off()


def _overlay(ax: Any, attn: torch.Tensor, size: tuple[int, int]) -> None:
    # nearest: one cell a patch, the grid the model sees
    a = attn.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp(min=1e-12)
    w, h = size
    up = F.interpolate(a[None, None], size=(h, w), mode='nearest')[0, 0]
    ax.imshow(up.numpy(), cmap=ATTENTION_CMAP, alpha=ATTENTION_OPACITY, extent=(-0.5, w - 0.5, h - 0.5, -0.5))


def _save_png(fig: Any, path: Path) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, format='png', metadata={'Software': None}))
