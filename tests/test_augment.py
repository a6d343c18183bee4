"""The batch augmentation's pure functions, each against an oracle: torchvision's functional transforms or by hand."""

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from timm_smallvit.augment import (
    BatchAugment,
    CropBoxes,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    alternating_flips,
    crop_flip_resize,
    sample_crop_boxes,
    sample_factors,
    sample_flips,
)


def _images(channels: int, size: int = 8, batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(channels))


@pytest.mark.parametrize('flip', [False, True])
def test_crop_flip_resize_cuts_the_box_at_pixel_centres(flip):
    # a box of half the width and height centred on a quadrant samples exactly the quadrant's pixel centres
    x = _images(3)
    B = x.shape[0]
    half, quarter = torch.full((B,), 0.5), torch.full((B,), 0.5)
    boxes = CropBoxes(half, half, -quarter, quarter)  # left half of the columns, bottom half of the rows
    flips = torch.full((B,), -1.0 if flip else 1.0)
    out = crop_flip_resize(x, boxes, flips, (4, 4))
    expected = TF.crop(x, top=4, left=0, height=4, width=4)
    if flip:
        expected = TF.hflip(expected)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_crop_flip_resize_per_image_flips():
    x = _images(1)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0])
    out = crop_flip_resize(x, CropBoxes.whole(4), flips, (8, 8))
    expected = torch.stack([TF.hflip(img) if f < 0 else img for img, f in zip(x, flips, strict=True)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ('mode', 'oracle'), [('bilinear', 'bilinear'), ('bicubic', 'bicubic'), ('nearest', 'nearest-exact')]
)
def test_crop_flip_resize_whole_box_is_a_resize(mode, oracle):
    # a whole box is a plain resize: torchvision's without antialiasing, at pixel centres (align_corners=False);
    # 12 -> 5 puts no sample exactly between two pixels, where nearest's rounding would be a coin toss
    x = _images(3, size=12)
    out = crop_flip_resize(x, CropBoxes.whole(4), torch.ones(4), (5, 5), mode)
    expected = TF.resize(x, [5, 5], interpolation=TF.InterpolationMode(oracle), antialias=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_sample_crop_boxes_stay_inside_and_follow_the_draw_order():
    B, scale, log_ratio = 1000, (0.08, 1.0), (math.log(3 / 4), math.log(4 / 3))
    boxes = sample_crop_boxes(B, scale, log_ratio, torch.Generator().manual_seed(0))
    assert all(t.shape == (B,) for t in boxes)
    assert (boxes.w > 0).all() and (boxes.w <= 1).all() and (boxes.h > 0).all() and (boxes.h <= 1).all()
    # inside the image: |centre| + half-extent <= 1 in normalised coordinates
    assert (boxes.cx.abs() <= 1 - boxes.w + 1e-6).all() and (boxes.cy.abs() <= 1 - boxes.h + 1e-6).all()
    unclipped = (boxes.w < 1) & (boxes.h < 1)
    area = boxes.w * boxes.h
    assert ((area[unclipped] >= scale[0] - 1e-6) & (area[unclipped] <= scale[1] + 1e-6)).all()
    ratio = (boxes.w / boxes.h)[unclipped].log()
    assert ((ratio >= log_ratio[0] - 1e-5) & (ratio <= log_ratio[1] + 1e-5)).all()
    # hand check of the draws: areas, log ratios, x, y, one batch each, from one stream
    g = torch.Generator().manual_seed(0)
    area0 = torch.empty(B).uniform_(*scale, generator=g)
    log_r0 = torch.empty(B).uniform_(*log_ratio, generator=g)
    rx, ry = torch.rand(B, generator=g), torch.rand(B, generator=g)
    torch.testing.assert_close(boxes.w, torch.sqrt(area0 * log_r0.exp()).clamp(max=1.0), atol=0, rtol=0)
    torch.testing.assert_close(boxes.h, torch.sqrt(area0 / log_r0.exp()).clamp(max=1.0), atol=0, rtol=0)
    torch.testing.assert_close(boxes.cx, (rx * 2 - 1) * (1 - boxes.w), atol=0, rtol=0)
    torch.testing.assert_close(boxes.cy, (ry * 2 - 1) * (1 - boxes.h), atol=0, rtol=0)


def test_sample_flips_and_factors():
    flips = sample_flips(10_000, 0.3, torch.Generator().manual_seed(0))
    assert set(flips.tolist()) == {-1.0, 1.0}
    assert abs((flips < 0).float().mean().item() - 0.3) < 0.02
    assert (sample_flips(100, 0.0) == 1).all() and (sample_flips(100, 1.0) == -1).all()
    factors = sample_factors(0.4, 10_000, torch.Generator().manual_seed(0))
    assert factors.shape == (10_000, 1, 1, 1)
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert sample_factors(1.5, 1000).min() >= 0  # timm's lower bound max(0, 1 - strength)


def _per_image(fn, x, factors):
    return torch.stack([fn(img, f.item()) for img, f in zip(x, factors.flatten(), strict=True)])


@pytest.mark.parametrize('channels', [1, 3])
def test_adjust_brightness_is_torchvisions(channels):
    x, factors = _images(channels), torch.tensor([0.5, 1.0, 1.3, 2.0]).view(4, 1, 1, 1)
    expected = _per_image(TF.adjust_brightness, x, factors)
    torch.testing.assert_close(adjust_brightness(x, factors), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize('channels', [1, 3])
def test_adjust_contrast_is_torchvisions(channels):
    x, factors = _images(channels), torch.tensor([0.0, 0.6, 1.0, 1.4]).view(4, 1, 1, 1)
    expected = _per_image(TF.adjust_contrast, x, factors)
    # torchvision's grayscale weighs red 0.2989, ours (PIL's) 0.299: equal for one channel, close for three
    atol = 1e-6 if channels == 1 else 1e-4
    torch.testing.assert_close(adjust_contrast(x, factors), expected, atol=atol, rtol=0)


def test_adjust_saturation_is_torchvisions():
    x, factors = _images(3), torch.tensor([0.0, 0.6, 1.0, 1.4]).view(4, 1, 1, 1)
    expected = _per_image(TF.adjust_saturation, x, factors)
    torch.testing.assert_close(adjust_saturation(x, factors), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(adjust_saturation(x, torch.ones(4, 1, 1, 1)), x, atol=1e-6, rtol=0)


def test_adjust_functions_leave_their_input_alone():
    x = _images(3)
    before = x.clone()
    factors = torch.full((4, 1, 1, 1), 1.5)
    for fn in (adjust_brightness, adjust_contrast, adjust_saturation):
        fn(x, factors)
    assert torch.equal(x, before)


@pytest.mark.parametrize('channels', [1, 3])
def test_batch_augment_composes_the_functions_in_draw_order(channels):
    x, size = _images(channels, size=28, batch=16), (24, 24)
    augment = BatchAugment(size, scale=(0.3, 1.0), hflip=0.5, color_jitter=(0.2, 0.3, 0.4))
    out = augment(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    boxes = sample_crop_boxes(16, (0.3, 1.0), augment.log_ratio, g)
    expected = crop_flip_resize(x, boxes, sample_flips(16, 0.5, g), size)
    expected = adjust_brightness(expected, sample_factors(0.2, 16, g))
    expected = adjust_contrast(expected, sample_factors(0.3, 16, g))
    if channels == 3:  # saturation of a gray image is the image: no draw
        expected = adjust_saturation(expected, sample_factors(0.4, 16, g))
    assert torch.equal(out, expected)
    assert out.shape == (16, channels, *size) and out.min() >= 0 and out.max() <= 1


def test_batch_augment_without_crop_is_resize_and_flip():
    x = _images(1, size=28, batch=8)
    out = BatchAugment((28, 28), scale=None, hflip=0.0)(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)  # grid_sample's pixel centres, up to rounding


def test_alternating_flips_mirror_each_image_every_other_epoch():
    parity = torch.randint(0, 2, (1000,), generator=torch.Generator().manual_seed(0))
    epochs = torch.stack([alternating_flips(parity, e) for e in range(4)])  # (epochs, images)
    assert set(epochs.unique().tolist()) == {-1.0, 1.0}
    assert (epochs[0] != epochs[1]).all() and (epochs[1] != epochs[2]).all()  # every image both ways in two epochs
    assert torch.equal(epochs[0], epochs[2]) and torch.equal(epochs[1], epochs[3])
    assert 0.45 < (epochs[0] == -1).float().mean() < 0.55  # half of them in any epoch, as hflip 0.5
    # coin flips (the default) show about half the images the same way in two epochs in a row: the oracle of why
    g = torch.Generator().manual_seed(1)
    assert 0.45 < (sample_flips(1000, 0.5, g) == sample_flips(1000, 0.5, g)).float().mean() < 0.55


def test_batch_augment_takes_given_flips_and_still_draws_the_crops():
    x, size = _images(1, size=28, batch=16), (24, 24)
    augment = BatchAugment(size, scale=(0.3, 1.0), hflip=0.5)
    flips = alternating_flips(torch.arange(16) % 2, epoch=1)
    out = augment(x, generator=torch.Generator().manual_seed(5), flips=flips)
    boxes = sample_crop_boxes(16, (0.3, 1.0), augment.log_ratio, torch.Generator().manual_seed(5))
    assert torch.equal(out, crop_flip_resize(x, boxes, flips, size))
