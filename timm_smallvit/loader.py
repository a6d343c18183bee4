"""Batches of an in-memory uint8 dataset for the quick trainer: one shard per process, normalised, augmented; a
validation holdout carved from the training images.

For 28-32 px images, per-image PIL transforms and worker processes cost more than the model; here the uint8 images
stay in one tensor and each batch is cropped, flipped and jittered as a whole (:class:`~timm_smallvit.augment.
BatchAugment`), then normalised and erased.
"""

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing

from .augment import BatchAugment, alternating_flips

__all__ = ['BatchLoader', 'hold_out']


class BatchLoader:
    """Batches of an in-memory uint8 dataset, normalised and (optionally) augmented, one shard per process.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        batch_size: Per-process batch size.
        mean, std: Normalisation, per channel, for [0, 1] images.
        img_size: Output size; eval batches are resized to it when the images differ.
        augment: Training augmentation; None for evaluation batches (resize only).
        erase: Random erasing (timm's, on normalised images) after augmentation.
        shuffle: Reshuffle every epoch (seeded with seed + epoch, identical on every process).
        drop_last: Drop the last partial batch (training).
        rank, world_size: This process's shard of each epoch's order.
        interpolation: Resize mode for evaluation batches.
        channels_last: Yield batches in NHWC memory layout (for a model converted to channels_last).
        alternate_flips: Mirror each image every other epoch (:func:`~timm_smallvit.augment.alternating_flips`,
            from a fixed random half given by ``seed``) instead of by a coin flip per image and epoch.
        device: Where the dataset is held and batches are built and augmented (a GPU: no per-batch copies and no
            CPU augmentation in the GPU's way; Fashion-MNIST is 47 MB). Random parameters are drawn on the CPU,
            so a seed gives the same crops and flips on every device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: tuple[int, int],
        augment: BatchAugment | None = None,
        erase: RandomErasing | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        interpolation: str = 'bilinear',
        channels_last: bool = False,
        alternate_flips: bool = False,
        device: torch.device | str = 'cpu',
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f'Expected (N, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}.')
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f'mean/std have {len(mean)}/{len(std)} values for {images.shape[1]}-channel images.')
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.img_size = tuple(img_size)
        self.augment = augment
        self.erase = erase
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.interpolation = interpolation if interpolation in ('bilinear', 'bicubic', 'nearest') else 'bilinear'
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        # each image's first mirrored epoch (0 or 1), the same on every process: indices are global
        self.flip_parity = None
        if alternate_flips:
            self.flip_parity = torch.randint(0, 2, (len(images),), generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # a fresh stream per epoch, so a run resumed at epoch N augments exactly as an uninterrupted one
        self.generator.manual_seed(self.seed * 1000 + self.rank + 7919 * epoch)

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return torch.arange(n)

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        n = len(self.images)
        return n // global_batch if self.drop_last else math.ceil(n / global_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Each step takes one global batch of the shared order and gives every process its slice of it, so
        # N processes with batch_size B see the same samples per step as one process with batch_size N * B.
        order = self._order().to(self.device)  # one copy an epoch, not one a batch
        global_batch = self.batch_size * self.world_size
        for i in range(len(self)):
            idx = torch.tensor_split(order[i * global_batch : (i + 1) * global_batch], self.world_size)[self.rank]
            x = self.images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
            if self.augment is not None:
                flips = None
                if self.flip_parity is not None and self.augment.hflip > 0:
                    flips = alternating_flips(self.flip_parity[idx.cpu()], self.epoch)
                x = self.augment(x, generator=self.generator, flips=flips)
            elif x.shape[-2:] != self.img_size:
                x = F.interpolate(x, size=self.img_size, mode=self.interpolation, align_corners=False)
            x = x.sub_(self.mean).div_(self.std)
            if self.erase is not None:
                x = self.erase(x)
            yield x.contiguous(memory_format=self.memory_format), self.labels[idx]


def hold_out(
    images: torch.Tensor, labels: torch.Tensor, n: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` training images held out for evaluation: (train x, train y, eval x, eval y).

    Drawn at random with a fixed generator, not the run's seed: the held-out set stays the same across seeds and
    runs, so their scores compare, and image folders (read class by class) give every class its share.
    """
    if n >= len(images):
        raise ValueError(
            f'val_holdout {n}: {name} has {len(images):,} training images, so nothing would be left to train on. '
            f'Hold out fewer (for example {len(images) // 12:,}), or set 0 to evaluate on the validation split.'
        )
    held = torch.zeros(len(images), dtype=torch.bool)
    held[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]] = True
    return images[~held], labels[~held], images[held], labels[held]
