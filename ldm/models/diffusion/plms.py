"""The original PLMSSampler, as a thin adapter over `sampling.sample_plms` (see `ddim.OriginalSampler`)."""
from ldm.models.diffusion.ddim import OriginalSampler


class PLMSSampler(OriginalSampler):
    sampler, label = "plms", "PLMS"
