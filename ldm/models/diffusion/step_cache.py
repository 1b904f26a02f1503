"""DeepCache-style step caching (Ma, Fang and Wang 2023): the UNet's deep features barely change from one
sampling step to the next, so they are computed on "full" steps only and reused on the steps between.

On a full step the UNet runs whole and the outputs of its deep blocks are kept. On a cached step only the
shallow branch runs: the input blocks up to `branch`, then the last `branch + 1` output blocks, the first of
which is fed the kept output of the output block before it (DeepCache's `prv_feature`) beside its live skip
connection. Branch 0, the reference implementation's choice for Stable Diffusion and LDM, leaves the first
convolution and the last output block (full resolution) to run on cached steps.

Full steps, counted in sampler steps from the pass's first: uniform, every `interval`-th (0, N, 2N, ...,
DeepCache's default); or non-uniform, denser around step `center` (DeepCache's `sample_from_quad_center`,
for the same number of full steps). Every model call within a full step is full (Heun's and DPM2's second
calls too), so the schedule means sampler steps whatever the sampler. The cache works through the UNet's
`block_runner` hook, with no change to its weights; `StepCache` removes itself on exit.
"""
from contextlib import contextmanager

import numpy as np
import torch

SCHEDULES = ("uniform", "non-uniform")
NON_UNIFORM_CENTER, NON_UNIFORM_POWER = 15, 1.4  # DeepCache's defaults for Stable Diffusion


def quadratic_full_steps(steps: int, count: int, center: int, power: float) -> list[int]:
    """`count` step indices from 0, spaced as |i - center|^power grows: dense near step `center`.

    DeepCache's sample_from_quad_center exactly as it computes: `count + 1` points evenly spaced between the
    power-th roots of -center (a complex root) and steps - center, raised to `power`, their real parts
    truncated; the power is lowered in 0.02 steps until that gives `count` distinct steps. ValueError when
    no power above 1 does.
    """
    while power > 1:
        low, high = complex(-center) ** (1 / power), complex(steps - center) ** (1 / power)
        points = np.linspace(low, high, count + 1) ** power
        offsets = np.unique(np.trunc(points.real).astype(np.int64))[1:-1]
        indices = [0] + [int(offset) + center for offset in offsets]
        if len(indices) == count:
            return indices
        power -= 0.02
    raise ValueError(f"DeepCache's non-uniform schedule has no {count} full steps in {steps}: use the uniform one")


def full_steps(steps: int, interval: int, schedule: str = "uniform") -> set[int]:
    """The steps (0-based, of a pass of `steps`) on which the whole UNet runs, for a cache `interval`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown DeepCache schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if interval < 2:
        raise ValueError(f"a cache interval of {interval} reuses nothing: give 2 or more")
    if schedule == "uniform":
        return set(range(0, steps, interval))
    count = -(-steps // interval)  # as many full steps as the uniform schedule has
    return set(quadratic_full_steps(steps, count, NON_UNIFORM_CENTER, NON_UNIFORM_POWER))


def deep_blocks(unet, branch: int = 0) -> list:
    """The blocks a cached step skips: input blocks after `branch`, the middle, output blocks before the last
    branch + 1. The last of them is the one whose kept output feeds the shallow branch."""
    last_input, output_count = len(unet.input_blocks) - 1, len(unet.output_blocks)
    if not 0 <= branch < last_input:
        raise ValueError(f"the cache branch must be in 0..{last_input - 1} for this UNet, not {branch}")
    return [*unet.input_blocks[branch + 1:], unet.middle_block, *unet.output_blocks[:output_count - 1 - branch]]


class StepCache:
    """DeepCache on one UNet for one sampling pass: `with StepCache(unet, full):`, with the sampler's callback
    wrapped by `counting` so that the cache knows the step.

    full: the full steps (see full_steps). Counters for the curious and for tests: `calls` (UNet calls),
    `full_calls` (of them, the ones that ran the deep blocks) and `steps` (callbacks seen).
    """

    def __init__(self, unet, full: set[int], branch: int = 0):
        if not hasattr(unet, "block_runner"):
            raise ValueError(f"step caching needs this project's UNetModel; {type(unet).__name__} is another network")
        self.unet, self.full = unet, set(full)
        self.skipped = {id(block) for block in deep_blocks(unet, branch)}
        self.first_block = unet.input_blocks[0]
        self.kept: dict[int, torch.Tensor] = {}
        self.kept_shape = None  # the input of the call whose deep outputs are kept
        self.steps = self.calls = self.full_calls = 0
        self.running_full = True

    def __enter__(self):
        if self.unet.block_runner is not None:
            raise RuntimeError("the UNet's block_runner is taken: one step cache at a time")
        self.unet.block_runner = self.run_block
        return self

    def __exit__(self, *exc):
        self.unet.block_runner = None
        self.kept.clear()

    def counting(self, callback):
        """callback, wrapped so that each sampler step it reports moves the cache to the next step."""
        def counted(info):
            self.steps += 1
            if callback is not None:
                return callback(info)
        return counted

    def run_block(self, block, x, *args):
        if block is self.first_block:  # a new UNet call: full or cached, for all its blocks
            self.calls += 1
            self.running_full = self.steps in self.full or self.kept_shape != tuple(x.shape)
            if self.running_full:
                self.full_calls += 1
                self.kept_shape = tuple(x.shape)
        if id(block) not in self.skipped:
            return block(x, *args)
        if self.running_full:
            self.kept[id(block)] = output = block(x, *args)
            return output
        # The UNet's loop still concatenates the skipped output blocks' inputs; the kept outputs keep those
        # shapes right, and only the last one's values reach the picture.
        return self.kept[id(block)]


@contextmanager
def step_caching(unet, interval: int, steps: int, schedule: str = "uniform"):
    """StepCache for a pass of `steps` sampler steps; interval 0 or 1: none (yields None), the UNet untouched."""
    if interval < 2:
        yield None
        return
    with StepCache(unet, full_steps(steps, interval, schedule)) as cache:
        yield cache
