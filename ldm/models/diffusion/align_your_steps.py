"""NVIDIA's "Align Your Steps" schedules (Sabour et al. 2024, arXiv:2404.14507), as A1111's "Align Your Steps".

NVIDIA published optimised 10-step schedules (11 sigmas, from the model's sigma_max to its sigma_min; the
sampler then jumps to 0) for Stable Diffusion 1.5 and SDXL, on its quick-start page
research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html. There is no published SD 2.x table: A1111
(modules/sd_schedulers.py) uses the SD 1.5 one for every model that is not SDXL, SD 2.x included, and so do we.
The tables do not depend on the model's own sigmas.

A1111's rule for other step counts, followed here exactly: a grid of `steps` sigmas then 0; the table as it is
when steps equals its length (11), else the table interpolated linearly in log sigma over an even spread of
`steps` points (its `loglinear_interp`). So 10 steps interpolate too, and 11 steps walk the table.
"""
import numpy as np
import torch

AYS_SIGMAS = {  # as A1111 writes them (three decimals)
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def loglinear_interpolation(sigmas, count: int) -> np.ndarray:
    """`count` points spread evenly over a descending table, interpolated linearly in log sigma."""
    positions = np.linspace(0, 1, len(sigmas))
    log_sigmas = np.log(np.asarray(sigmas, dtype=np.float64))
    return np.exp(np.interp(np.linspace(0, 1, count), positions, log_sigmas[::-1]))[::-1].copy()


def align_your_steps_sigmas(steps: int, table: str = "sd1") -> torch.Tensor:
    """`steps` + 1 descending sigmas ending at 0, from NVIDIA's table for the model family `table`."""
    published = AYS_SIGMAS[table]
    chosen = published if steps == len(published) else loglinear_interpolation(published, steps)
    return torch.cat([torch.as_tensor(np.asarray(chosen, dtype=np.float64)), torch.zeros(1, dtype=torch.float64)])
