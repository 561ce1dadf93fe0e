"""Synthetic digits for the tests: a small, learnable fake MNIST written as the four IDX files."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from mnistnets.data import MNIST_FILES, write_idx


# Seven-segment glyphs in a 10x16 box centred on 0: segment -> (x0, y0, x1, y1); y grows downward.
_SEGMENTS = {
    "a": (-5, -8, 5, -8), "b": (5, -8, 5, 0), "c": (5, 0, 5, 8), "d": (-5, 8, 5, 8),
    "e": (-5, 0, -5, 8), "f": (-5, -8, -5, 0), "g": (-5, 0, 5, 0),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def _render_synthetic(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Seven-segment digits with a class-specific blob, random shift/scale/slant/width, and noise."""
    n = len(labels)
    seg = torch.tensor(list(_SEGMENTS.values()), dtype=torch.float32)  # [7,4]
    names = list(_SEGMENTS)
    on = torch.zeros(10, 7, dtype=torch.bool)
    for d, segs in enumerate(_DIGIT_SEGMENTS):
        for s in segs:
            on[d, names.index(s)] = True
    # a small dot whose place on a ring around the glyph's centre tells the class, as a second cue
    ang = torch.arange(10, dtype=torch.float32) * (2 * math.pi / 10)
    dots = torch.stack([3.0 * torch.cos(ang), 3.0 * torch.sin(ang) * 1.3], 1)  # [10,2], inside the box

    r = torch.rand(n, 6, generator=gen)
    shift = (r[:, 0:2] - 0.5) * 4.0  # +-2 px
    scale = 0.95 + 0.1 * r[:, 2:3]
    slant = (r[:, 3:4] - 0.5) * 0.2  # italic shear
    width = 1.5 + 0.3 * r[:, 4:5]  # stroke half-width in px
    bright = 180.0 + 75.0 * r[:, 5:6]

    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    px, py = xs.reshape(1, -1) - 13.5, ys.reshape(1, -1) - 13.5  # [1,784], centred
    out = torch.empty(n, 784)
    for start in range(0, n, 1024):  # chunks bound the memory for big n
        sl = slice(start, start + 1024)
        # pixel -> glyph coordinates (inverse of scale, slant, shift)
        gy = (py - shift[sl, 1:2]) / scale[sl]
        gx = (px - shift[sl, 0:1]) / scale[sl] + slant[sl] * gy
        gx, gy = gx.unsqueeze(1), gy.unsqueeze(1)  # [b,1,784]
        x0, y0, x1, y1 = (seg[:, i].view(1, 7, 1) for i in range(4))
        dx, dy = x1 - x0, y1 - y0
        t = (((gx - x0) * dx + (gy - y0) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
        dist = torch.hypot(gx - (x0 + t * dx), gy - (y0 + t * dy))  # [b,7,784]
        dist = dist.masked_fill(~on[labels[sl]].unsqueeze(2), 1e3).amin(1)  # [b,784]
        dot = dots[labels[sl]]  # [b,2]
        ddist = torch.hypot(gx[:, 0] - dot[:, 0:1], gy[:, 0] - dot[:, 1:2]) - 0.6
        dist = torch.minimum(dist, ddist)
        ink = ((width[sl] - dist) / 1.0 + 0.5).clamp(0, 1)  # anti-aliased edge
        out[sl] = ink * bright[sl]
    noise = torch.randn(n, 784, generator=gen) * 12.0
    img = (out + noise * (out > 0)).clamp(0, 255).round().to(torch.uint8)
    return img.reshape(n, 28, 28)


def make_synthetic_mnist(folder, n_train: int = 512, n_test: int = 256, seed: int = 0, gz: bool = True) -> Path:
    """Write the four MNIST IDX files of a small learnable fake MNIST into ``folder``; return it.

    Each class is a seven-segment rendering of its digit (randomly shifted, scaled, slanted and
    thickened, with noise on the strokes) plus a dot at a class-specific place: a tiny CNN gets
    far above chance in an epoch or two. Classes are balanced; the files are byte-identical for a
    given seed (gzip with a fixed mtime).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(int(seed))
    for split, n in (("train", n_train), ("test", n_test)):
        if n < 1:
            raise ValueError(f"n_{split} must be >= 1, got {n}")
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]
        images = _render_synthetic(labels, gen)
        for kind, t in (("images", images), ("labels", labels.to(torch.uint8))):
            base = MNIST_FILES[f"{split}_{kind}"]
            name, other = (base + ".gz", base) if gz else (base, base + ".gz")
            (folder / other).unlink(missing_ok=True)  # no stale twin in the other format
            write_idx(folder / name, t)
    return folder
