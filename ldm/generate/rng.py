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
import random
from dataclasses import dataclass

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

    @staticmethod
    def seeded_normal(shape, seed: int) -> torch.Tensor:
        """The first draw of a fresh CPU generator seeded with `seed` (a Brownian tree's node)."""
        return CpuRandom(int(seed)).randn(shape)

    def brownian_seeds(self, batch_size: int) -> int:
        """One Brownian tree over the whole batch (the run's one-generator mode), seeded from this generator."""
        return int(torch.randint(0, 2**63 - 1, [], generator=self.generator))


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

    @staticmethod
    def seeded_normal(shape, seed: int) -> torch.Tensor:
        """The first draw of a CUDA generator seeded with `seed` (a Brownian tree's node, as torchsde draws it
        when k-diffusion builds its trees on an NVIDIA GPU)."""
        return NvRandom(int(seed)).randn(shape)

    def brownian_seeds(self, batch_size: int) -> int:
        """As CpuRandom's: a 63-bit seed from the first two 32-bit words of this source's next Philox draw."""
        counter = np.array([[self.offset & 0xFFFFFFFF], [self.offset >> 32], [0], [0]], dtype=np.uint64)
        key = np.array([[self.seed & 0xFFFFFFFF], [self.seed >> 32]], dtype=np.uint64)
        self.offset += 1
        low, high = (int(word[0]) for word in philox4x32(counter, key)[:2])
        return (low | high << 32) & (2**63 - 1)


RNG_SOURCES = {"cpu": CpuRandom, "nv": NvRandom}
RNG_INFOTEXT_NAMES = {"cpu": "CPU", "nv": "NV"}  # as A1111 writes its "RNG" field


def noise_source(rng: str, seed: int):
    """A source with randn(shape) -> float32 CPU tensor, for "cpu" or "nv"."""
    if rng not in RNG_SOURCES:
        raise ValueError(f"unknown RNG {rng!r}: choose one of {', '.join(RNG_SOURCES)}")
    return RNG_SOURCES[rng](seed)


# A1111's seeds: each image of a run has its own seed and its own source (its modules/rng.py ImageRNG).
SEED_MODES = ("a1111", "batch")  # batch: the originals' one generator for the whole run
RANDOM_SEED = -1
A1111_RANDOM_SEEDS = 4294967294  # seed -1 means random.randrange(this), as A1111's get_fixed_seed


@dataclass(frozen=True)
class RunSeeds:
    """A run's seeds as A1111 counts them (its all_seeds, all_subseeds): image k of the run (across its
    batches and iterations) has seed `seed + k`, or `seed` for every image when a variation seed is mixed
    in, whose `subseed + k` then differs per image. seed and subseed are -1 resolved to real ones."""
    seed: int
    subseed: int | None = None  # None: no variation seed
    subseed_strength: float = 0.0

    @classmethod
    def resolve(cls, seed: int, subseed: int = RANDOM_SEED, subseed_strength: float = 0.0) -> "RunSeeds":
        real = lambda value: random.randrange(A1111_RANDOM_SEEDS) if value == RANDOM_SEED else value
        return cls(real(seed), real(subseed) if subseed_strength else None, subseed_strength)

    def image_seed(self, index: int) -> int:
        return self.seed if self.subseed is not None else self.seed + index

    def image_subseed(self, index: int) -> int | None:
        return None if self.subseed is None else self.subseed + index

    def images(self, rng: str, first_index: int, count: int, resize_from=None, ensd: int = 0) -> "ImageNoise":
        """The per-image sources of `count` images from the run's image `first_index` on."""
        indices = range(first_index, first_index + count)
        subseeds = None if self.subseed is None else [self.image_subseed(i) for i in indices]
        return ImageNoise(rng, [self.image_seed(i) for i in indices], subseeds, self.subseed_strength,
                          resize_from, ensd)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of one image's two noises [C, H, W], strength 0 -> low, 1 -> high.

    As A1111 computes it, so that its variation seeds give its noise: the angle is taken per channel and
    column (norms over dim 1), and where the two are nearly parallel it falls back to a linear mix that
    weights them the other way round (low·strength + high·(1 - strength)), as A1111 does.
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return ((torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1) * low
            + (torch.sin(strength * omega) / sin_omega).unsqueeze(1) * high)


def paste_centred(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """`large` [C, H, W] with `small` [C, h, w] pasted at its centre (cropped centred where it is larger)."""
    dx, dy = (large.shape[2] - small.shape[2]) // 2, (large.shape[1] - small.shape[1]) // 2
    width = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    height = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    to_x, to_y, from_x, from_y = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    large[:, to_y:to_y + height, to_x:to_x + width] = small[:, from_y:from_y + height, from_x:from_x + width]
    return large


class ImageNoise:
    """The numbers of one batch whose images each have a seed (A1111's ImageRNG): image i's draws come from
    its own source seeded with seeds[i], so an image does not depend on the others in its batch.

    `first(shape)` is the start noise, in A1111's order for each image: the variation seed's noise (a fresh
    source of subseeds[i]), then the seed's own, their slerp at `subseed_strength`, and with `resize_from`
    (a latent (h, w)) the noise made at that size pasted at the centre of a full-size draw. After it, with
    a non-zero `ensd` each image's source starts again from seed + ensd (A1111's "eta noise seed delta"),
    so that sampler noise changes and the start noise does not. `randn([n, ...])` stacks each image's
    next draw of [...]: later sampler noise, or the posterior noise of img2img's init latent.
    """

    def __init__(self, rng: str, seeds: list[int], subseeds: list[int] | None = None, subseed_strength: float = 0.0,
                 resize_from: tuple[int, int] | None = None, ensd: int = 0):
        self.rng, self.seeds, self.subseeds = rng, list(seeds), subseeds
        self.subseed_strength, self.resize_from, self.ensd = subseed_strength, resize_from, ensd
        self.sources = [noise_source(rng, seed) for seed in self.seeds]

    def first(self, shape) -> torch.Tensor:
        self._check_batch(shape)
        image_shape = list(shape[1:])
        made_shape = image_shape if self.resize_from is None else [image_shape[0], *self.resize_from]
        images = []
        for i, (seed, source) in enumerate(zip(self.seeds, self.sources)):
            variation = None
            if self.subseeds is not None and self.subseed_strength != 0:
                variation = noise_source(self.rng, self.subseeds[i]).randn(made_shape)
            noise = source.randn(image_shape) if made_shape == image_shape else noise_source(self.rng, seed).randn(made_shape)
            if variation is not None:
                noise = slerp(self.subseed_strength, noise, variation)
            if made_shape != image_shape:
                noise = paste_centred(noise, source.randn(image_shape))
            images.append(noise)
        if self.ensd:
            self.sources = [noise_source(self.rng, seed + self.ensd) for seed in self.seeds]
        return torch.stack(images)

    def randn(self, shape) -> torch.Tensor:
        self._check_batch(shape)
        return torch.stack([source.randn(list(shape[1:])) for source in self.sources])

    def brownian_seeds(self, batch_size: int) -> list[int]:
        """One Brownian tree per image, seeded with the image's seed (as A1111: not seed + ENSD)."""
        return self.seeds[:batch_size]

    def seeded_normal(self, shape, seed: int) -> torch.Tensor:
        return RNG_SOURCES[self.rng].seeded_normal(shape, seed)

    def _check_batch(self, shape):
        if shape[0] != len(self.seeds):
            raise ValueError(f"a draw for {shape[0]} images from the noise of {len(self.seeds)} images")
