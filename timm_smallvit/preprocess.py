"""One place that reads and validates preprocessing metadata, and converts images as training decodes them.

    check_data_config   a pretrained_cfg, an export's config.json, an ONNX file's metadata, a checkpoint's training
                        args or a recipe -> its data-config keys (timm's names), checked
    check_label_names   label_names -> a list of strings, one per class
    to_model_mode       any PIL image (16-bit, 32-bit, float, palette, RGBA, CMYK, 1-bit) -> the model's mode ('L' or
                        'RGB'), as training decodes image folders (:mod:`timm_smallvit.data` calls it too)

Every reader of a model's preprocessing goes through here (``smallvit predict`` on any model, the ONNX classifier,
checked pulls and pushes, checkpoints, recipes), and the writers (``smallvit export``, ``smallvit onnx``) check what
they write with the same functions, so nothing is written that a reader would refuse. A violation is a ValueError of
one line: the file (or other source), the key, the value, and what was expected.

The bounds keep the work of preprocessing one image small whatever a file says. timm's eval transform resizes an
image so that its shorter side is ``input_size / crop_pct``, then crops ``input_size``: with sides of at most
:data:`MAX_SIDE` (512, over five times the largest smallvit input, 96) and ``crop_pct`` at least 0.5 (twice the
side), no image is ever resized past 1024 x 1024 (3 MB as RGB bytes, 12 MB as floats). ``crop_pct: 0.0005`` (a
56,000 px resize of a 28 px image, 3.8 GB) and ``input_size: [1, 100000, 100000]`` are refused by name.
``crop_pct`` above 1 shrinks the image and pads the crop (timm's own configs go up to 1.15); up to 1.5 is taken.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision.transforms import InterpolationMode

__all__ = [
    'CHANNELS',
    'CROP_MODES',
    'CROP_PCT_RANGE',
    'DATA_KEYS',
    'INTERPOLATIONS',
    'MAX_SIDE',
    'MIN_SIDE',
    'MIN_STD',
    'check_data_config',
    'check_label_names',
    'check_side',
    'to_model_mode',
]

# timm's data-config keys, what its eval transform (create_transform) takes
DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
MIN_SIDE, MAX_SIDE = 2, 512  # pixels, for input_size, img_size and the test sizes (see the module docstring)
CROP_PCT_RANGE = (0.5, 1.5)
# std divides every pixel: below this a pixel's noise becomes values in the thousands, and 0 gives inf and NaN
MIN_STD = 1e-3
CHANNELS = (1, 3)  # the image modes a model reads: 'L' and 'RGB'
CROP_MODES = ('center', 'squash', 'border')  # timm's eval transform's; any other name silently means 'center'


def _timm_knows(name: str) -> bool:
    try:
        str_to_interp_mode(name)
    except KeyError:
        return False
    return True


# the names timm's eval transform resizes with (torchvision's modes that timm maps): nearest, bilinear, bicubic, ...
INTERPOLATIONS = tuple(m.value for m in InterpolationMode if _timm_knows(m.value))
_SIDES_KEYS = ('input_size', 'test_input_size')
_ABSENT = (None, '')


def check_data_config(
    cfg: Mapping[str, Any],
    *,
    source: str,
    in_chans: int | None = None,
    num_classes: int | None = None,
    img_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The data-config keys of ``cfg`` that are set, checked; lists become tuples, as timm keeps them.

    Checked when present (None or '' is unset): ``input_size`` ``[C, H, W]`` and ``test_input_size`` (C in
    :data:`CHANNELS` and equal to ``in_chans``, sides whole numbers in [MIN_SIDE, MAX_SIDE]), ``img_size`` (a side or
    ``[H, W]``) and ``in_chans`` (training args), ``interpolation`` (one of :data:`INTERPOLATIONS`), ``mean`` and
    ``std`` (finite numbers, one or one per channel; ``std`` at least :data:`MIN_STD`), ``crop_pct`` and
    ``test_crop_pct`` (in :data:`CROP_PCT_RANGE`), ``crop_mode`` (one of :data:`CROP_MODES`), and, with
    ``num_classes``, ``label_names`` (:func:`check_label_names`).

    Args:
        cfg: A pretrained_cfg, config.json's pretrained_cfg, ONNX metadata, training args or a recipe.
        source: What it was read from (a file, ``hf-hub:<repo>``, a recipe), named first in errors.
        in_chans: The model's input channels, when known (the weights, the graph's input).
        num_classes: The model's classes, when known: then label_names in cfg are checked against them.
        img_size: The ``(H, W)`` a fixed-size model is built at (or a graph takes): input_size must match it.

    Returns:
        The keys of :data:`DATA_KEYS`, ``img_size``, ``in_chans``, ``test_input_size`` and ``test_crop_pct`` that cfg
        sets, as checked.

    Raises:
        ValueError: One line: ``SOURCE: KEY VALUE: expected ...``.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f'{source}: {_shown(cfg)}: expected a mapping of data-config keys (input_size, mean, ...).')
    out: dict[str, Any] = {}
    chans = in_chans
    if cfg.get('in_chans') is not None:
        out['in_chans'] = chans = _channels(cfg['in_chans'], 'in_chans', source, in_chans)
    for key in _SIDES_KEYS:
        if cfg.get(key) is not None:
            out[key] = _input_size(cfg[key], key, source, chans, img_size if key == 'input_size' else None)
            chans = out[key][0]
    if cfg.get('img_size') is not None:
        out['img_size'] = _img_size(cfg['img_size'], source)
    if cfg.get('interpolation') not in _ABSENT:
        value = cfg['interpolation']
        if not isinstance(value, str) or value not in INTERPOLATIONS:
            _refuse(source, 'interpolation', value, f'one of {", ".join(INTERPOLATIONS)} (what timm resizes with)')
        out['interpolation'] = value
    for key in ('mean', 'std'):
        if cfg.get(key) is not None:
            out[key] = _per_channel(cfg[key], key, source, chans)
    for key in ('crop_pct', 'test_crop_pct'):
        if cfg.get(key) is not None:
            out[key] = _crop_pct(cfg[key], key, source)
    if cfg.get('crop_mode') not in _ABSENT:
        if not isinstance(cfg['crop_mode'], str) or cfg['crop_mode'] not in CROP_MODES:
            _refuse(source, 'crop_mode', cfg['crop_mode'], f'one of {", ".join(CROP_MODES)}')
        out['crop_mode'] = cfg['crop_mode']
    if num_classes is not None and cfg.get('label_names') is not None:
        check_label_names(cfg['label_names'], source=source, num_classes=num_classes)
    return out


def check_label_names(labels: Any, *, source: str, num_classes: int) -> list[str] | None:
    """``labels`` as a list of ``num_classes`` strings; None when there are none.

    A string is refused (read per character it would name one class per letter), and so are more or fewer names
    than classes. Any characters are allowed in the names: what prints them escapes them
    (:func:`timm_smallvit._terminal.printable`).

    Args:
        labels: label_names as read (None: no names, the classes are shown by index).
        source: What they were read from, named first in errors.
        num_classes: The model's classes (its classifier's outputs).
    """
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        _refuse(source, 'label_names', labels, f'a list of {num_classes} class names (strings), one per class')
    wrong = next((i for i, name in enumerate(labels) if not isinstance(name, str)), None)
    if wrong is not None:
        _refuse(source, 'label_names', labels, f'strings, but name {wrong} is {_shown(labels[wrong])}')
    if len(labels) != num_classes:
        _refuse(source, 'label_names', labels, f'{num_classes} names, one per class, got {len(labels)}')
    return list(labels)


def check_side(value: Any, key: str, source: str) -> int:
    """A side in pixels: a whole number in [MIN_SIDE, MAX_SIDE] (recipes' img_size and model_kwargs img_size)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SIDE <= value <= MAX_SIDE:
        _refuse(source, key, value, f'a whole number of pixels in [{MIN_SIDE}, {MAX_SIDE}]')
    return value


def to_model_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` converted to ``mode`` ('L' or 'RGB') as training decodes image folders, pixels loaded.

    Pillow's ``convert`` clips 16-bit values at 255, which leaves a two-level silhouette of a 16-bit PNG: 16-bit and
    32-bit integer images ('I;16', 'I;16B', 'I') are scaled from 0-65535 to 0-255 (rounded, values outside clipped),
    so a 16-bit PNG gives its 8-bit twin's pixels within one level. Float images ('F') are read on Pillow's 0-255
    scale, rounded and clipped. Every other mode (palette, RGBA, LA, CMYK, '1', ...) is Pillow's ``convert``.

    Args:
        img: Any PIL image.
        mode: The model's mode: 'L' (1 channel) or 'RGB' (3).
    """
    if mode not in ('L', 'RGB'):
        raise ValueError(f"image mode {mode!r}: expected 'L' (1 channel) or 'RGB' (3 channels).")
    if img.mode.startswith('I;16') or img.mode == 'I':
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    elif img.mode == 'F':
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8))
    return img.convert(mode)  # a copy with its pixels loaded even when the mode is already right


def _channels(value: Any, key: str, source: str, expected: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in CHANNELS:
        _refuse(source, key, value, '1 (grayscale) or 3 (RGB) channels')
    if expected is not None and value != expected:
        _refuse(source, key, value, f'{expected}, the channels the model takes')
    return value


def _input_size(
    value: Any, key: str, source: str, chans: int | None, img_size: tuple[int, int] | None
) -> tuple[int, int, int]:
    what = f'[C, H, W]: C 1 or 3, H and W whole numbers of pixels in [{MIN_SIDE}, {MAX_SIDE}]'
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_int(v) for v in value):
        _refuse(source, key, value, what)
    c, h, w = value
    if c not in CHANNELS or not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        _refuse(source, key, value, what)
    if chans is not None and c != chans:
        _refuse(source, key, value, f'{chans} first: the channels the model takes')
    if img_size is not None and (h, w) != tuple(img_size):
        _refuse(source, key, value, f'[{c}, {img_size[0]}, {img_size[1]}], the size the model is built at')
    return c, h, w


def _img_size(value: Any, source: str) -> int | tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return check_side(value[0], 'img_size', source), check_side(value[1], 'img_size', source)
    return check_side(value, 'img_size', source)


def _per_channel(value: Any, key: str, source: str, chans: int | None) -> tuple[float, ...]:
    what = 'a finite number' if chans == 1 else f'1 or {chans or 3} finite numbers (one per channel)'
    if key == 'std':
        what += f', each at least {MIN_STD} (every pixel is divided by it)'
    values = (value,) if _is_number(value) else value
    if not isinstance(values, (list, tuple)) or not all(_is_number(v) and math.isfinite(v) for v in values):
        _refuse(source, key, value, what)
    low = MIN_STD if key == 'std' else -math.inf
    if len(values) not in ((1, chans) if chans is not None else (1, *CHANNELS)) or not all(v >= low for v in values):
        _refuse(source, key, value, what)
    return tuple(values)


def _crop_pct(value: Any, key: str, source: str) -> float:
    low, high = CROP_PCT_RANGE
    if not _is_number(value) or not low <= value <= high:
        _refuse(
            source, key, value,
            f'a number in [{low}, {high}] (the image is resized to input_size / {key} before the crop: a small '
            f'{key} enlarges every image)',
        )  # fmt: skip
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any, limit: int = 80) -> str:
    # JSON escapes control characters, so the value cannot break the one line; a long one is cut
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + '...'


def _refuse(source: str, key: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f'{source}: {key} {_shown(value)}: expected {expected}.')
