"""Training batches from the device: ``DeviceLoader`` and its augmentation, ``AugmentConfig``.

``DeviceLoader`` keeps a whole split as one uint8 tensor on the device, serves batches by index
slices, normalizes with the MNIST mean/std and augments each batch with one batched random affine
warp (``affine_grid`` + ``grid_sample``). Shuffling and augmentation are a deterministic function
of ``(seed, epoch)``, so a run resumed from a checkpoint sees exactly the batches an uninterrupted
run would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import check_augment
from ..seeds import loader_seed

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass
class AugmentConfig:
    """Random affine augmentation, drawn per image. 0 disables a kind.

    rotation: max degrees (uniform in [-r, r]); translate: max shift as a fraction of the image
    side (per axis); scale: max relative zoom (factor in [1-s, 1+s]); shear: max x-shear degrees.
    """

    rotation: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0

    def __post_init__(self) -> None:
        check_augment(self.rotation, self.translate, self.scale, self.shear)

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in (self.rotation, self.translate, self.scale, self.shear))

    def thetas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random inverse affine matrices [n,2,3] for ``F.affine_grid`` (CPU, float32).

        The forward warp is translate . rotate . shear . scale about the image centre; affine_grid
        wants the map from output to input coordinates, i.e. its inverse. Normalized coordinates
        of a square image are isotropic, so degrees mean degrees.
        """
        u = torch.rand(n, 5, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
        rot = torch.deg2rad(u[:, 0] * self.rotation)
        shear = torch.tan(torch.deg2rad(u[:, 1] * self.shear))
        s = 1 + u[:, 2] * self.scale
        tx, ty = u[:, 3] * self.translate * 2, u[:, 4] * self.translate * 2  # normalized range is 2
        cos, sin = torch.cos(rot), torch.sin(rot)
        # forward A = R @ Sh @ S, Sh = [[1, shear], [0, 1]], S = s*I
        a11, a12 = cos * s, (cos * shear - sin) * s
        a21, a22 = sin * s, (sin * shear + cos) * s
        det = a11 * a22 - a12 * a21
        i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
        theta = torch.stack([
            torch.stack([i11, i12, -(i11 * tx + i12 * ty)], 1),
            torch.stack([i21, i22, -(i21 * tx + i22 * ty)], 1),
        ], 1)
        return theta.float()


class DeviceLoader:
    """Batches of one split held as a single uint8 tensor on ``device``.

    Yields ``(x, y)``: x float32 [B,1,28,28] normalized ((x/255 - 0.1307)/0.3081), y int64 [B].
    ``shuffle`` draws a permutation per epoch; ``augment`` (an ``AugmentConfig``) warps each batch
    with one random affine per image (bilinear, zero padding in raw-pixel space, before the
    normalization). Both come from a private CPU generator seeded from ``(seed, epoch)``:
    ``set_epoch(e)`` selects the epoch; without it each pass takes the next epoch number.
    """

    def __init__(self, images_uint8, labels, batch_size: int, *, device="cpu", shuffle: bool = False,
                 augment: AugmentConfig | None = None, drop_last: bool = False, seed: int = 0):
        images = torch.as_tensor(images_uint8)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceLoader wants uint8 images, got {images.dtype}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"DeviceLoader wants images [N,28,28] or [N,1,28,28], got {list(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"{len(images)} images but labels of shape {list(labels.shape)}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment if augment is not None and augment.enabled else None
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self._scale = 1.0 / (255.0 * MNIST_STD)
        self._shift = MNIST_MEAN / MNIST_STD

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s order and augmentation (reproducibly)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1  # a later pass without set_epoch gets the next epoch
        gen = torch.Generator().manual_seed(loader_seed(self.seed, epoch))
        n, b = self.num_samples, self.batch_size
        stop = (n // b) * b if self.drop_last else n
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        thetas = self.augment.thetas(n, gen).to(self.device) if self.augment is not None else None
        return self._batches(order, thetas, stop)

    def _batches(self, order, thetas, stop):
        b = self.batch_size
        for i in range(0, stop, b):
            if order is None:
                x, y = self.images[i:i + b], self.labels[i:i + b]
            else:
                idx = order[i:i + b]
                x, y = self.images[idx], self.labels[idx]
            x = x.float()
            if thetas is not None:
                theta = thetas[i:i + b]
                grid = F.affine_grid(theta, list(x.shape), align_corners=False)
                x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            yield x.mul_(self._scale).sub_(self._shift), y

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.num_samples}, batch_size={self.batch_size}, device={self.device}, "
            f"shuffle={self.shuffle}, augment={self.augment}, drop_last={self.drop_last}, seed={self.seed})"
        )
