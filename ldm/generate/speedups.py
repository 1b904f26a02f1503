"""Opt-in ways to spend less on each sampling step, at a cost to the picture: DeepCache-style step caching
(--deepcache, ldm.models.diffusion.step_cache) and token merging (--token_merging_ratio and the hires pass's
--token_merging_ratio_hr, A1111's settings; ldm.modules.token_merging). Off by default: the picture is then
exactly the one made without them.
"""
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ldm.generate.errors import UserError
from ldm.models.diffusion.step_cache import SCHEDULES, StepCache, full_steps
from ldm.modules.token_merging import MAX_RATIO, TokenMerging


@dataclass(frozen=True)
class Speedups:
    deepcache: int = 0  # the cache interval: the deep blocks run every this many steps; 0 = off
    deepcache_schedule: str = "uniform"  # or "non-uniform" (step_cache.SCHEDULES)
    token_merging_ratio: float = 0.0  # 0 = off
    token_merging_ratio_hr: float | None = None  # the hires pass's; None: no hires pass

    def ratio(self, hires: bool) -> float:
        return self.token_merging_ratio_hr if hires and self.token_merging_ratio_hr is not None \
            else self.token_merging_ratio


def add_arguments(group):
    group.add_argument("--deepcache", type=int, default=0, metavar="N",
                       help="DeepCache step caching: the UNet's deep blocks run on every N-th step only; the steps "
                            "between reuse their features and run the outermost blocks alone (on SD 1.x under a tenth "
                            "of a step's FLOPs), at some cost to the picture (N >= 2; default 0 = off)")
    group.add_argument("--deepcache_schedule", type=str.lower, choices=SCHEDULES, default="uniform",
                       help="which steps run the whole UNet: uniform (every N-th, default) or non-uniform "
                            "(DeepCache's: as many, denser around step 15)")
    group.add_argument("--token_merging_ratio", type=float, default=0.0, metavar="R",
                       help=f"token merging (ToMe for SD, A1111's setting): merge this share of the tokens in the "
                            f"self-attention of the highest-resolution transformer blocks, 0..{MAX_RATIO} (default "
                            "0 = off; 0.5 is common)")


def add_hires_argument(group):
    group.add_argument("--token_merging_ratio_hr", type=float, default=0.0, metavar="R",
                       help="the hires pass's token merging ratio (A1111's; default 0: --token_merging_ratio's)")


def _check_ratio(flag: str, ratio: float):
    if not 0.0 <= ratio <= MAX_RATIO:  # NaN too
        raise UserError(f"{flag} {ratio} is outside [0, {MAX_RATIO}]: 0 is off, {MAX_RATIO} the most (one token "
                        "of each 2x2 cell is kept; 0.5 is common)")


def from_args(args) -> Speedups:
    """The Speedups asked for, checked: one line naming the option for each bad value."""
    if args.deepcache < 0 or args.deepcache == 1:
        raise UserError(f"--deepcache {args.deepcache} caches nothing: give 2 or more (the deep blocks run every "
                        "N-th step), or 0 for off")
    if args.deepcache_schedule != "uniform" and not args.deepcache:
        raise UserError("--deepcache_schedule applies to step caching, which is off: add --deepcache N, or drop it")
    if args.deepcache and args.deepcache >= args.ddim_steps:
        raise UserError(f"--deepcache {args.deepcache} with {args.ddim_steps} steps never reuses the cache: use "
                        f"fewer than {args.ddim_steps} (or more steps), or drop --deepcache")
    if args.deepcache_schedule == "non-uniform":
        try:
            full_steps(args.ddim_steps, args.deepcache, args.deepcache_schedule)
        except ValueError as error:
            raise UserError(f"--deepcache_schedule: {error}") from None
    _check_ratio("--token_merging_ratio", args.token_merging_ratio)
    hires = getattr(args, "hr_scale", None) is not None or getattr(args, "hr_resize_x", 0) or getattr(args, "hr_resize_y", 0)
    ratio_hr = None
    if hires:
        _check_ratio("--token_merging_ratio_hr", args.token_merging_ratio_hr)
        ratio_hr = args.token_merging_ratio_hr or args.token_merging_ratio  # A1111's: 0 falls back
    return Speedups(args.deepcache, args.deepcache_schedule, args.token_merging_ratio, ratio_hr)


def infotext_fields(speedups: Speedups) -> dict:
    """A1111's "Token merging ratio" and "Token merging ratio hr" (where not 0), and "DeepCache" (the interval)."""
    fields = {}
    if speedups.token_merging_ratio:
        fields["Token merging ratio"] = speedups.token_merging_ratio
    if speedups.token_merging_ratio_hr:
        fields["Token merging ratio hr"] = speedups.token_merging_ratio_hr
    if speedups.deepcache:
        fields["DeepCache"] = speedups.deepcache
        if speedups.deepcache_schedule != "uniform":
            fields["DeepCache schedule"] = speedups.deepcache_schedule
    return fields


@contextmanager
def for_pass(speedups: Speedups, unet, steps: int, seed: int, hires: bool = False):
    """Step caching and token merging on `unet` for one sampling pass of `steps` steps; yields a function
    that wraps the sampler's callback (step caching counts the steps through it).

    seed: the token merging's random picks come from a generator seeded with it (the batch's first image's
    seed), so that the seed makes the picture again.
    """
    with ExitStack() as stack:
        counting = lambda callback: callback  # noqa: E731 - no step cache: the callback as it is
        if speedups.deepcache:
            try:
                full = full_steps(steps, speedups.deepcache, speedups.deepcache_schedule)
            except ValueError:  # a pass shorter than the job's (img2img, hires) with no non-uniform schedule
                full = full_steps(steps, speedups.deepcache)
            try:
                cache = stack.enter_context(StepCache(unet, full))
            except ValueError as error:
                raise UserError(f"--deepcache: {error}") from None
            counting = cache.counting
        ratio = speedups.ratio(hires)
        if ratio:
            try:
                merging = TokenMerging(unet, ratio, torch.Generator().manual_seed(seed))
            except ValueError as error:
                raise UserError(f"--token_merging_ratio: {error}") from None
            stack.enter_context(merging)
        yield counting
