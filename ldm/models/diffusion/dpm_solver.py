"""The original DPMSolverSampler (DPM-Solver++, multistep, order 2), as a thin adapter over
`sampling.sample_dpm_solver` (see `ddim.OriginalSampler`)."""
from ldm.models.diffusion.ddim import OriginalSampler


class DPMSolverSampler(OriginalSampler):
    sampler, label = "dpm", "DPM-Solver"
