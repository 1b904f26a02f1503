"""Where a seed's random numbers come from (A1111's "RNG" setting): `cpu` or `nv`.

cpu: torch's CPU generator, `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`.

nv: the numbers `torch.randn(shape, device="cuda")` gives on an NVIDIA GPU after `manual_seed(seed)`,
computed here on any CPU, so that a seed shared by someone on an NVIDIA card makes the same start noise.
torch's CUDA randn gives element i of a draw from curand's Philox 4x32-10 generator, keyed by the seed,
with counter (draw offset, 0, i, 0), turned into a normal by Box-Muller (the sine half, from the first two
of the four 32-bit words). Each draw moves the offset on by one, so element i of a draw depends only on
the seed, the number of draws before it and i: the first n numbers of a larger draw equal an n-number
draw made at the same point, while two draws of n never equal one draw of 2n.

That is what the GPU does as long as a draw has no more elements than the card runs threads at once
(blocks of 256 up to its multiprocessor count times its threads per multiprocessor: some 10^5 on current
cards, several batches of SD latents). Past that the card wraps elements onto threads it has already used
and their numbers depend on the card; like A1111's "NV" source, this one keeps counting instead, so it
reproduces A1111's NV noise (to an ulp of float32, see the scales below) at every size, a given card's only
up to that size.
"""
import math

import numpy as np
import torch

# Philox 4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), as curand uses it
PHILOX_ROUNDS = 10
_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
_LOW_32 = np.uint64(0xFFFFFFFF)
_SHIFT_32 = np.uint64(32)

# curand scales a 32-bit word by 2^-32 (and by 2pi/2^32 for the angle) in float32; evaluating the transform
# with the exact scales in float64 and rounding once to float32 comes closest to the CUDA values quoted in
# tests/test_rng.py (float32-rounded scales, as A1111's NV source has them, land up to two ulps away).
_TWO_POW32_INV = 2.0 ** -32
_TWO_POW32_INV_2PI = 2.0 ** -32 * 2 * math.pi


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox 4x32-10 of counters [4, n] under keys [2, n]; 32-bit words held in uint64 arrays."""
    c0, c1, c2, c3 = (word.astype(np.uint64) for word in counter)
    k0, k1 = (word.astype(np.uint64) for word in key)
    m0, m1 = (np.uint64(m) for m in _ROUND_MULTIPLIERS)
    for round_number in range(PHILOX_ROUNDS):
        if round_number:
            k0 = (k0 + np.uint64(_KEY_INCREMENTS[0])) & _LOW_32
            k1 = (k1 + np.uint64(_KEY_INCREMENTS[1])) & _LOW_32
        product0, product1 = c0 * m0, c2 * m1  # a 32-bit word times a 32-bit constant fits 64 bits
        c0, c1, c2, c3 = ((product1 >> _SHIFT_32) ^ c1 ^ k0, product1 & _LOW_32,
                          (product0 >> _SHIFT_32) ^ c3 ^ k1, product0 & _LOW_32)
    return np.stack([c0, c1, c2, c3])


def box_muller_sine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal curand's Box-Muller makes of two uniform 32-bit words: sqrt(-2 ln u)·sin(v)."""
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2  # in (0, 1]: the log is finite
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


def nv_normals(seed: int, offset: int, count: int) -> np.ndarray:
    """`count` normals, float32: the draw made after `offset` draws from a CUDA generator seeded with `seed`."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"the seed must be in 0..2^64-1, not {seed}")
    index = np.arange(count, dtype=np.uint64)
    counter = np.zeros((4, count), dtype=np.uint64)
    counter[0], counter[1] = offset & 0xFFFFFFFF, offset >> 32
    counter[2], counter[3] = index & _LOW_32, index >> _SHIFT_32
    key = np.array([[seed & 0xFFFFFFFF], [seed >> 32]], dtype=np.uint64).repeat(count, axis=1)
    words = philox4x32(counter, key)
    return box_muller_sine(words[0], words[1])


class CpuRandom:
    """torch's CPU generator, seeded once."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(list(shape), generator=self.generator)


class NvRandom:
    """The numbers of torch.randn on an NVIDIA GPU seeded with `seed`, one draw after another (see above)."""

    generator = None  # no torch generator stands behind these numbers

    def __init__(self, seed: int):
        self.seed, self.offset = seed, 0

    def randn(self, shape) -> torch.Tensor:
        shape = list(shape)
        values = nv_normals(self.seed, self.offset, math.prod(shape))
        self.offset += 1
        return torch.from_numpy(values).reshape(shape)


RNG_SOURCES = {"cpu": CpuRandom, "nv": NvRandom}
RNG_INFOTEXT_NAMES = {"cpu": "CPU", "nv": "NV"}  # as A1111 writes its "RNG" field


def noise_source(rng: str, seed: int):
    """A source with randn(shape) -> float32 CPU tensor, for "cpu" or "nv"."""
    if rng not in RNG_SOURCES:
        raise ValueError(f"unknown RNG {rng!r}: choose one of {', '.join(RNG_SOURCES)}")
    return RNG_SOURCES[rng](seed)
