"""A run's randomness as a function of (seed, epoch): the two seed mixers, in one place.

Two mixers exist for history, not by design: the loader's (data order and augmentation) is a
splitmix64 finalizer, the trainer's (the global RNG, i.e. dropout) a linear mix. Replacing either
by the other would change every trained model's weights, and the README's accuracy figures are
measured per seed and bit-reproducible; merging them is left for the change that re-measures
those figures.
"""
from __future__ import annotations


def loader_seed(seed: int, epoch: int) -> int:
    """The data order and augmentation of epoch ``epoch``: a 63-bit seed from (seed, epoch)
    (splitmix64 finalizer), so nearby pairs are unrelated."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1


def dropout_seed(seed: int, epoch: int) -> int:
    """The global torch RNG (dropout) of epoch ``epoch``."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)
