"""Brownian-tree noise for the SDE samplers, giving the numbers torchsde's BrownianTree gives for a seed.

k-diffusion's SDE samplers (and so A1111 and ComfyUI) draw their noise from a Brownian motion W on [sigma_min,
sigma_max]: the noise for a step from sigma to sigma_next is (W(sigma_next) - W(sigma)) / sqrt(|sigma_next -
sigma|). Because W is one fixed path for a seed, queried at whatever points the steps need, 20 and 21 steps
see nearly the same noise and the image changes smoothly with the step count.

The path is the one torchsde.BrownianTree (torchsde 0.2.6; a BrownianInterval with halfway_tree=True, tol=1e-6,
pool_size=24, no Levy area) builds for `entropy=seed`, written here from its algorithm so that no torchsde is
needed at run time:
- the interval [t0, t1] is the root of a binary tree whose nodes are split at their (rounded) halfway point;
  every time is rounded to 6 decimals (the tolerance), and a query point is reached by halving until a
  node's midpoint is that point;
- the root's increment is N(0, t1 - t0), drawn with torch's CPU generator seeded from
  numpy.random.SeedSequence(seed, pool_size=24).generate_state(3)[0];
- a node splits with the seeds SeedSequence(seed, spawn_key=(key, depth), pool_size=24).generate_state(4)
  (key = 2·parent's key + 0 for a left child, 1 for a right one; the root is (0, 0)); its left child's increment
  is the Brownian bridge draw mean + sqrt(var)·N(0, 1) from the first of those seeds, the right child's the
  parent's increment minus the left's;
- a query (ta, tb) sums the increments of the nodes that partition [ta, tb].
The value of every node depends only on the seed and the node, so the path does not depend on the order or
the number of the queries. Each node's draw is the first of a fresh generator seeded with its seed: torch's CPU
generator's by default, as A1111 gets them when it samples on the CPU; with `--rng nv` the noise source hands
the trees CUDA's numbers for that seed (ldm.generate.rng), which is what torchsde draws when A1111 samples on an
NVIDIA GPU (k-diffusion builds the trees on the latents' device there, whatever A1111's RNG setting).
"""
import math
from collections import OrderedDict

import numpy as np
import torch

TOLERANCE_DIGITS = 6  # torchsde's BrownianTree: tol=1e-6
POOL_SIZE = 24  # torchsde's BrownianTree default
_CACHE_SIZE = 45  # increments kept (each is one image's noise); recomputing one gives the same bits


def _round(t: float) -> float:
    return round(t, TOLERANCE_DIGITS)


def cpu_seeded_normal(shape, seed) -> torch.Tensor:
    """The first draw of torch's CPU generator seeded with `seed`."""
    return torch.randn(list(shape), generator=torch.Generator().manual_seed(int(seed)))


class _Node:
    __slots__ = ("start", "end", "parent", "is_left", "key", "depth", "midway", "bridge_seed", "left", "right")

    def __init__(self, start, end, parent=None, is_left=None):
        self.start, self.end, self.parent, self.is_left = _round(start), _round(end), parent, is_left
        self.key = 0 if parent is None else 2 * parent.key + (0 if is_left else 1)
        self.depth = 0 if parent is None else parent.depth + 1
        self.midway = None


class BrownianTree:
    """One Brownian path of `shape` on [t0, t1] for `seed`: `increment(ta, tb)` = W(tb) - W(ta), ta <= tb."""

    def __init__(self, t0: float, t1: float, shape, seed: int, seeded_normal=cpu_seeded_normal):
        t0, t1 = float(t0), float(t1)
        if t0 > t1:  # t0 == t1 is a grid of one step, to 0, which draws no noise
            raise ValueError(f"a Brownian tree needs t0 <= t1, not {t0} and {t1}")
        self.shape, self.seed, self.seeded_normal = tuple(shape), int(seed), seeded_normal
        self.root = _Node(t0, t1)
        root_seed = np.random.SeedSequence(entropy=self.seed, pool_size=POOL_SIZE).generate_state(3)[0]
        self.root_increment = seeded_normal(self.shape, root_seed) * math.sqrt(t1 - t0)
        self._cache = OrderedDict()

    def _split(self, node: _Node, target: float):
        """Halve `node` and then the child holding `target`, until a midpoint is `target`."""
        while True:
            node.midway = _round(0.5 * (node.end + node.start))
            seeds = np.random.SeedSequence(entropy=self.seed, spawn_key=(node.key, node.depth),
                                           pool_size=POOL_SIZE).generate_state(4)
            node.bridge_seed = seeds[0]
            node.left = _Node(node.start, node.midway, node, True)
            node.right = _Node(node.midway, node.end, node, False)
            if target == node.midway:
                return
            node = node.right if target > node.midway else node.left

    def _partition(self, node: _Node, ta: float, tb: float, out: list):
        """Append to `out` the nodes under `node` that partition [ta, tb], splitting where needed."""
        while not (ta == node.start and tb == node.end):
            if node.midway is None:
                self._split(node, tb if ta == node.start else ta)
            if tb <= node.midway:
                node = node.left
            elif ta >= node.midway:
                node = node.right
            else:
                self._partition(node.left, ta, node.midway, out)
                node, ta = node.right, node.midway
        out.append(node)

    def _increment_of(self, node: _Node) -> torch.Tensor:
        if node.parent is None:
            return self.root_increment
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        parent = node.parent
        parent_increment = self._increment_of(parent)
        reciprocal = 1 / (parent.end - parent.start)
        left_length, right_length = parent.midway - parent.start, parent.end - parent.midway
        # the Brownian bridge: the left half's increment given the whole's (same operation order as torchsde)
        mean = left_length * parent_increment * reciprocal
        deviation = math.sqrt(left_length * right_length * reciprocal)
        left = mean + deviation * self.seeded_normal(self.shape, parent.bridge_seed)
        value = left if node.is_left else parent_increment - left
        self._cache[node] = value
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    def increment(self, ta: float, tb: float) -> torch.Tensor:
        ta, tb = float(ta), float(tb)
        if ta > tb:
            raise ValueError(f"query times must satisfy ta <= tb, not {ta} > {tb}")
        ta = min(max(ta, self.root.start), self.root.end)
        tb = min(max(tb, self.root.start), self.root.end)
        if ta == tb:
            return torch.zeros(self.shape)
        nodes = []
        self._partition(self.root, _round(ta), _round(tb), nodes)
        total = self._increment_of(nodes[0])
        for node in nodes[1:]:
            total = total + self._increment_of(node)
        return total


class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler: (sigma, sigma_next) -> unit-variance noise for that step.

    `seeds` is a list (one tree per image, each of one image's shape, stacked: A1111's per-image seeds, so an
    image's noise does not depend on the batch) or an int (one tree over the whole batch). Times are taken in
    float32, as A1111's sigmas are, so that a seed queries the same points of the path.
    """

    def __init__(self, shape, sigma_min: float, sigma_max: float, seeds, seeded_normal=cpu_seeded_normal):
        low, high = sorted((_float32(sigma_min), _float32(sigma_max)))
        self.batched = isinstance(seeds, (list, tuple))
        if self.batched:
            if len(seeds) != shape[0]:
                raise ValueError(f"{len(seeds)} Brownian seeds for a batch of {shape[0]}")
            self.trees = [BrownianTree(low, high, shape[1:], seed, seeded_normal) for seed in seeds]
        else:
            self.trees = [BrownianTree(low, high, shape, seeds, seeded_normal)]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        sigma, sigma_next = torch.tensor(float(sigma)).float(), torch.tensor(float(sigma_next)).float()
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        increments = torch.stack([tree.increment(float(low), float(high)) for tree in self.trees]) * sign
        noise = increments if self.batched else increments[0]
        return noise / (sigma_next - sigma).abs().sqrt()


def _float32(value) -> float:
    return float(torch.tensor(float(value)).float())


def brownian_seeds(noise_source, batch_size: int):
    """The seeds of a run's Brownian trees: the source's brownian_seeds(batch_size) (a list: one tree per image;
    an int: one tree over the batch); a source without that method (a bare randn source) gives one 63-bit int
    made of the bits of its next two float32 draws, so the trees still follow the source's seed."""
    chosen = getattr(noise_source, "brownian_seeds", None)
    if chosen is not None:
        return chosen(batch_size)
    low, high = (int(word) for word in noise_source.randn([2]).numpy().view(np.uint32))
    return (low | high << 32) & (2**63 - 1)


def brownian_noise_for(noise_source, shape, sigmas: torch.Tensor) -> BrownianNoise:
    """As A1111's create_noise_sampler: trees over [min positive sigma, max sigma] of the whole grid (img2img's
    too, not only its run part), seeded from the run's noise source."""
    return BrownianNoise(shape, float(sigmas[sigmas > 0].min()), float(sigmas.max()),
                         brownian_seeds(noise_source, shape[0]),
                         getattr(noise_source, "seeded_normal", cpu_seeded_normal))
