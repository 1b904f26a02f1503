"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR`, as in the original `ldm.lr_scheduler`.

The original configs name `ldm.lr_scheduler.LambdaLinearScheduler` under `scheduler_config` with lists
(one entry per cycle) of warm_up_steps, f_start, f_max, f_min and cycle_lengths; the trainer calls
`schedule(step)` once per optimizer step and multiplies the base learning rate by the result.
"""
import numpy as np


class LambdaLinearScheduler:
    """Per cycle: linear warm-up from f_start to f_max over warm_up_steps, then linear from f_max
    towards f_min, reached at the end of the cycle. Steps past the last cycle stay in the last one.

    The SD configs use one endless cycle with f_max = f_min = 1: a plain warm-up to the base rate.
    """

    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval=0):
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start,
                 "cycle_lengths": cycle_lengths}
        lengths = {name: len(values) for name, values in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"LambdaLinearScheduler needs one entry per cycle in every list, got {lengths}")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cycle_starts = np.cumsum([0] + self.cycle_lengths[:-1])
        self.verbosity_interval = verbosity_interval
        self.last_f = None

    def find_cycle(self, n):
        return int(np.searchsorted(self.cycle_starts, n, side="right")) - 1

    def schedule(self, n, **ignored):
        cycle = self.find_cycle(n)
        n = n - self.cycle_starts[cycle]
        warm_up, length = self.warm_up_steps[cycle], self.cycle_lengths[cycle]
        if n < warm_up:
            f = self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / warm_up
        else:
            f = self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * max(length - n, 0) / length
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"lr schedule: step {n} of cycle {cycle}, factor {f:.4g}")
        self.last_f = float(f)
        return self.last_f

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)
