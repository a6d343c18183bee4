"""Training augmentation on whole batches: small pure functions, composed by :class:`BatchAugment`.

For 28-32 px images, per-image PIL transforms cost more than the model, so every image of a batch gets its own crop
box, flip and jitter factors, and the crop, flip and resize happen in one ``grid_sample`` call.

Each step is split in two: a ``sample_*`` function draws the random parameters from a CPU generator (so a seed gives
the same batch on any device), and a pure function applies given parameters (tested alone against torchvision's
functional transforms). :class:`BatchAugment` draws in a fixed order: crop (area, log ratio, x, y), flip,
brightness, contrast, saturation; a change to that order changes every seeded training run.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    'LUMA',
    'BatchAugment',
    'CropBoxes',
    'adjust_brightness',
    'adjust_contrast',
    'adjust_saturation',
    'alternating_flips',
    'crop_flip_resize',
    'sample_crop_boxes',
    'sample_factors',
    'sample_flips',
]

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # PIL's RGB -> L weights (torchvision: 0.2989 for R)


class CropBoxes(NamedTuple):
    """One crop box per image, in ``grid_sample``'s normalised coordinates: the image spans [-1, 1].

    ``w`` and ``h`` are the box's width and height as fractions of the image's, ``cx`` and ``cy`` its centre.
    """

    w: torch.Tensor  # (B,)
    h: torch.Tensor  # (B,)
    cx: torch.Tensor  # (B,)
    cy: torch.Tensor  # (B,)

    @classmethod
    def whole(cls, batch: int) -> 'CropBoxes':
        """Boxes covering every image whole (resize only)."""
        ones, zeros = torch.ones(batch), torch.zeros(batch)
        return cls(ones, ones, zeros, zeros)


def sample_crop_boxes(
    batch: int,
    scale: Sequence[float],
    log_ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> CropBoxes:
    """Random-resized-crop boxes, as timm's ``RandomResizedCropAndInterpolation`` draws them, inside the image.

    Draws 4 * ``batch`` values in this order: areas, log aspect ratios, x centres, y centres.

    Args:
        batch: Number of boxes.
        scale: Range of the box's area, as a fraction of the image's.
        log_ratio: Range of the log of the box's aspect ratio (width / height).
        generator: CPU generator the values come from.
    """
    area = torch.empty(batch).uniform_(*scale, generator=generator)
    log_r = torch.empty(batch).uniform_(*log_ratio, generator=generator)
    # width and height clipped to the image (torchvision retries instead), the centre anywhere that keeps it inside
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - h)
    return CropBoxes(w, h, cx, cy)


def sample_flips(batch: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) -1.0 where an image is flipped horizontally (probability ``p``), else 1.0; draws ``batch`` values."""
    return torch.where(torch.rand(batch, generator=generator) < p, -1.0, 1.0)


def alternating_flips(parity: torch.Tensor, epoch: int) -> torch.Tensor:
    """(B,) -1.0 where an image is flipped in this epoch, else 1.0: each image every other epoch (airbench).

    ``parity`` (B,) holds each image's fixed random 0 or 1: an image is mirrored in the epochs where ``parity +
    epoch`` is odd. Half the images are mirrored in any epoch, as with ``hflip: 0.5``, but every image is seen both
    ways in any two epochs in a row, where independent coin flips show half of them the same way twice. Draws
    nothing.
    """
    return torch.where((parity + epoch) % 2 == 1, -1.0, 1.0)


def sample_factors(
    strength: float, batch: int, generator: torch.Generator | None = None, device: torch.device | str = 'cpu'
) -> torch.Tensor:
    """(B, 1, 1, 1) jitter factors, uniform in [max(0, 1 - strength), 1 + strength], drawn on the CPU."""
    factors = torch.empty(batch, 1, 1, 1).uniform_(max(0.0, 1 - strength), 1 + strength, generator=generator)
    return factors.to(device)


def crop_flip_resize(
    x: torch.Tensor,
    boxes: CropBoxes,
    flips: torch.Tensor,
    size: Sequence[int],
    mode: str = 'bilinear',
) -> torch.Tensor:
    """Each image's box cut out, flipped where ``flips`` is -1, and resized to ``size``, in one ``grid_sample``.

    Args:
        x: (B, C, H, W) float images.
        boxes: One box per image (:class:`CropBoxes`).
        flips: (B,) -1.0 (flip) or 1.0.
        size: Output (height, width).
        mode: ``grid_sample``'s interpolation ('bilinear', 'bicubic' or 'nearest').
    """
    B = x.shape[0]
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = boxes.w * flips
    theta[:, 0, 2] = boxes.cx
    theta[:, 1, 1] = boxes.h
    theta[:, 1, 2] = boxes.cy
    grid = F.affine_grid(theta.to(x.device), [B, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode='border', align_corners=False)


def adjust_brightness(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` per image: ``x`` in [0, 1] scaled by (B, 1, 1, 1) ``factors``."""
    return (x * factors).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_contrast`` per image: blended with the mean of its grayscale by ``factors``."""
    gray = x.mean(dim=1, keepdim=True) if x.shape[1] == 1 else (x * LUMA.to(x)).sum(1, keepdim=True)
    return (factors * x + (1 - factors) * gray.mean(dim=(2, 3), keepdim=True)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_saturation`` per image: (B, 3, H, W) blended with its grayscale by ``factors``."""
    gray = (x * LUMA.to(x)).sum(1, keepdim=True)
    return (factors * x + (1 - factors) * gray).clamp_(0, 1)


class BatchAugment:
    """timm's training augmentation for a whole batch: random-resized crop, horizontal flip, colour jitter.

    Same parameters as timm's ``create_transform(is_training=True)`` (``scale``, ``ratio``, ``hflip``,
    ``color_jitter``): each image gets its own crop box, flip and jitter factors, and the resize to ``img_size``
    happens in the same ``grid_sample`` call. ``scale=None`` skips cropping (resize only). Random erasing works on
    normalised images, so the loader applies it after normalising.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        scale: Sequence[float] | None = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | Sequence[float] | None = None,
        interpolation: str = 'bilinear',
    ) -> None:
        self.img_size = tuple(img_size)
        self.scale = tuple(scale) if scale is not None else None
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = hflip
        if color_jitter is None or isinstance(color_jitter, (int, float)):
            color_jitter = (float(color_jitter or 0.0),) * 3  # timm: one value is brightness, contrast, saturation
        self.jitter = tuple(float(c) for c in color_jitter[:3])  # hue (a 4th value) is not applied
        self.mode = interpolation if interpolation in ('bilinear', 'bicubic', 'nearest') else 'bilinear'

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator | None = None, flips: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: float images in [0, 1], (B, C, H, W) -> augmented (B, C, *img_size), still in [0, 1].

        The random parameters come from ``generator`` on the CPU (so a seed gives the same batch on any device);
        the resampling runs where ``x`` is. ``flips`` ((B,) -1.0 or 1.0, on the CPU) replaces the drawn flips
        (:func:`alternating_flips`): the crop boxes are drawn as without it, the jitter factors next.
        """
        B = x.shape[0]
        boxes = (
            CropBoxes.whole(B) if self.scale is None else sample_crop_boxes(B, self.scale, self.log_ratio, generator)
        )
        if flips is None:
            flips = sample_flips(B, self.hflip, generator)
        x = crop_flip_resize(x, boxes, flips, self.img_size, self.mode)

        brightness, contrast, saturation = self.jitter  # applied in this order (torchvision shuffles it)
        if brightness > 0:
            x = adjust_brightness(x, sample_factors(brightness, B, generator, x.device))
        if contrast > 0:
            x = adjust_contrast(x, sample_factors(contrast, B, generator, x.device))
        if saturation > 0 and x.shape[1] == 3:
            x = adjust_saturation(x, sample_factors(saturation, B, generator, x.device))
        return x
