"""``smallvit predict``: classify image files with any smallvit model and draw what it attends to.

    load_model         a pretrained name (``smallvit_tiny_convstem_28.fmnist``), ``local-dir:``, ``hf-hub:`` or a
                       training checkpoint -> an eval-mode model whose pretrained_cfg says how to preprocess
    find_images        files, folders (recursively) and globs -> image paths, each file once, no link followed
    predict            images -> top-k labels, through timm's own data config and eval transform, and with
                       attention_dir a figure of what the model attends to (:mod:`timm_smallvit.attention`)

Preprocessing is the model's own: ``resolve_model_data_config`` + ``create_transform`` on PIL images, so the numbers are
those of ``model(transform(img))``.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from tqdm import tqdm

from ._terminal import printable
from .attention import PooledAttention
from .checkpoint import as_smallvit, model_from_checkpoint, model_img_size
from .data import IMAGE_EXTENSIONS
from .export import CONFIG_NAME
from .hub import create_model
from .plots import save_attention_figure
from .preprocess import check_data_config, to_model_mode
from .smallvit import SmallViT

__all__ = ['READ_ERRORS', 'find_images', 'load_model', 'predict', 'read_image', 'unreadable_reason']

_logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.safetensors')
# what Pillow raises for a file it cannot read as an image: a record with an error, the other images still predicted
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def load_model(ref: str) -> SmallViT:
    """The model a reference names, in eval mode, with label_names in its pretrained_cfg when they are known.

    Args:
        ref: A registered name, usually with a pretrained tag (``smallvit_tiny_convstem_28.fmnist``);
            ``local-dir:<folder>`` or ``hf-hub:<repo>`` (an export); or a training checkpoint (``last.pth.tar``,
            ``model_best.pth.tar``, whose EMA weights are used when it has them) or an exported ``.safetensors``.
    """
    model = _load(ref)
    # whatever the model came from, its preprocessing is checked before an image is resized by it
    fixed = None if model.dynamic_img_size else model_img_size(model)
    check_data_config(
        model.pretrained_cfg, source=ref, in_chans=model.in_chans, num_classes=model.num_classes, img_size=fixed
    )
    return model


def _load(ref: str) -> SmallViT:
    if ref.startswith(('local-dir:', 'hf-hub:')):
        return as_smallvit(create_model(ref, pretrained=True), ref).eval()
    path = Path(ref)
    if path.exists() or ref.endswith(_CHECKPOINT_SUFFIXES):
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            return as_smallvit(create_model(f'local-dir:{path}', pretrained=True), ref).eval()
        if not path.is_file():
            raise FileNotFoundError(f'model {ref}: no such checkpoint file.')
        return model_from_checkpoint(path)
    if not timm.is_model(ref.split('.')[0]) or not ref.startswith('smallvit'):
        raise ValueError(
            f'model {ref!r}: not a smallvit name, a local-dir:<folder> or hf-hub:<repo> export, nor a checkpoint file. '
            f'Pretrained names: {", ".join(timm.list_pretrained("smallvit*.*"))}.'
        )
    try:
        model = timm.create_model(ref, pretrained=True)
    except RuntimeError as e:  # timm's "Invalid pretrained tag", "No pretrained weights exist"
        raise ValueError(f'model {ref}: {e}') from e
    return as_smallvit(model, ref).eval()


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from paths, folders (searched recursively, by image extension) and glob patterns, in order.

    A file named on its own is taken whatever its extension (if it is not an image, predict says so); folders and
    globs contribute files with an image extension (:data:`~timm_smallvit.data.IMAGE_EXTENSIONS`). Inside a folder or
    below a pattern's fixed part, symbolic links are not followed (a link out of the folder, or back into it as
    ``up -> ..`` or ``self -> .``, would read other files, the same ones again, or loop), and each file is taken
    once, however many names lead to it.
    """
    extensions = IMAGE_EXTENSIONS
    found: dict[tuple[int, int], Path] = {}
    links: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in _walk(path, ('**', '*'), links, hidden=True) if p.suffix.lower() in extensions)
            if not files:
                raise FileNotFoundError(f'{path}: no image files in this folder (searched recursively).')
        elif path.is_file():
            files = [path]
        elif glob.has_magic(item):
            parts = path.parts
            fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            base = Path(*parts[:fixed]) if fixed else Path()
            files = sorted(p for p in _walk(base, parts[fixed:], links) if p.suffix.lower() in extensions)
            if not files:
                raise FileNotFoundError(f'{item}: no image files match this pattern.')
        else:
            raise FileNotFoundError(f'{item}: no such file or folder.')
        for file in files:
            st = file.stat()
            found.setdefault((st.st_dev, st.st_ino), file)  # a second name of a file already found: not again
    # the links that would have counted: to an image file, or to a folder
    skipped = [p for p in dict.fromkeys(links) if p.suffix.lower() in extensions or p.is_dir()]
    if skipped:
        _logger.warning(
            'Skipped %d symbolic link(s) inside the folders and patterns searched (%s%s): links there are not '
            'followed; name a file itself to predict it.',
            len(skipped), printable(skipped[0]), ', ...' if len(skipped) > 1 else '',
        )  # fmt: skip
    return list(found.values())


def _walk(
    folder: Path, pattern: Sequence[str], links: list[Path], hidden: bool = False, above: frozenset = frozenset()
) -> Iterator[Path]:
    """The regular files below folder whose path matches pattern (glob's components, ``**`` for any folders), found
    without following a symbolic link (each one met is added to ``links``) or entering a folder twice."""
    try:
        st = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    here = (st.st_dev, st.st_ino)
    if here in above:  # a folder inside itself (a bind mount): once is enough
        return
    head, rest = pattern[0], pattern[1:]
    if head == '**':
        if rest:
            yield from _walk(folder, rest, links, hidden, above)
        subfolders = [e for e in entries if (hidden or not e.name.startswith('.'))]
        for entry in subfolders:
            if entry.is_symlink():
                links.append(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), pattern, links, hidden, above | {here})
        return
    for entry in entries:
        if not _matches(head, entry.name, hidden):
            continue
        if entry.is_symlink():
            links.append(Path(entry.path))
        elif rest and entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), rest, links, hidden, above | {here})
        elif not rest and entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


def _matches(pattern: str, name: str, hidden: bool) -> bool:
    # glob's rules: a wildcard does not match a leading dot unless the pattern has one
    if not glob.has_magic(pattern):
        return name == pattern
    if name.startswith('.') and not (hidden or pattern.startswith('.')):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _image_mode(model: SmallViT) -> str:
    return 'L' if model.pretrained_cfg.get('input_size', (3,))[0] == 1 else 'RGB'


def read_image(path: Path, mode: str) -> tuple[Image.Image, str]:
    """The image in a file, converted to ``mode`` as training converts it, and the mode it had.

    Args:
        path: An image file.
        mode: The model's mode, 'L' or 'RGB'.
    """
    with Image.open(path) as img:
        img.load()
        return to_model_mode(img, mode), img.mode


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
    extractor = PooledAttention(model) if attention_dir is not None else None
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
                img, original = read_image(path, mode)
            except READ_ERRORS as e:
                records.append({'file': str(path), 'error': unreadable_reason(e)})
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
                save_attention_figure(
                    images[j],
                    last[j],
                    rollout[j],
                    out_dir / f'{name}.png',
                    title,
                    pooled_by_token=extractor.pooled_by_token,
                )
                records[slot]['attention'] = str(out_dir / f'{name}.png')
    bar.close()
    return records


def _chans(mode: str) -> str:
    return '1 channel (grayscale)' if mode == 'L' else '3 channels (RGB)'


def unreadable_reason(e: BaseException) -> str:
    """One line saying why Pillow could not read an image file."""
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
