"""The original sampler classes (DDIMSampler, and the base of PLMSSampler and DPMSolverSampler) as thin
adapters over `sampling`, for code written against the CompVis / Stability API.

`sample(...)` returns (samples, intermediates) like the originals, intermediates holding 'x_inter' and
'pred_x0' every log_every_t steps. Differences, each deliberate:
- Options that change the sampling rule and that no released script uses (quantize_x0, temperature,
  noise_dropout, score_corrector, and any other non-None keyword) raise instead of being ignored.
- eta must be 0 for PLMS (as in the original) and for DPM-Solver (which the original silently ignored).
- DPMSolverSampler returns intermediates too (the original returned None) and honours mask/x0.
"""
import torch

from ldm.models.diffusion.sampling import GuidedDenoiser, Schedule, noise_to_step, placement_of, sample, sample_ddim


def _mask_blend(mask, known, schedule):
    """The originals' masked sampling: where mask is 1, x is replaced by `known` noised to the step's t."""
    if mask is None:
        return None
    if known is None:
        raise ValueError("mask needs x0, the latent of the region to keep")

    def blend(x, t):
        # Fresh noise every step, as the originals' q_sample(x0, t) draws it.
        return noise_to_step(schedule, known, t, torch.randn_like(known)) * mask + (1.0 - mask) * x

    return blend


class OriginalSampler:
    """The shared adapter: subclasses only name their sampler."""

    sampler = None  # one of sampling.SAMPLERS
    label = None  # the name the originals print

    def __init__(self, model, schedule="linear", device=None, **_unused):
        # `schedule` and `device` are accepted as the originals accept them: the model's own schedule and
        # device are what they (and we) actually use.
        self.model = model
        self.schedule = Schedule(model.alphas_cumprod)

    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, quantize_x0=False,
               eta=0., mask=None, x0=None, temperature=1., noise_dropout=0., score_corrector=None,
               corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100, unconditional_guidance_scale=1.,
               unconditional_conditioning=None, **kwargs):
        unsupported = {"quantize_x0": quantize_x0, "temperature": temperature != 1.0,
                       "noise_dropout": noise_dropout != 0.0, "score_corrector": score_corrector is not None,
                       **{key: value is not None for key, value in kwargs.items()}}
        if any(unsupported.values()):
            raise ValueError(f"unsupported sampler option(s): {', '.join(k for k, v in unsupported.items() if v)}")
        denoiser = GuidedDenoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                  **placement_of(self.model))
        size = (batch_size, *shape)
        x = torch.randn(size, device=denoiser.device) if x_T is None else x_T.float()
        if verbose:
            print(f"Data shape for {self.label} sampling is {size}, eta {eta}")
        intermediates = {"x_inter": [x], "pred_x0": [x]}

        def on_step(info):
            if callback is not None:
                callback(info["i"])
            if img_callback is not None:
                img_callback(info["x0"], info["i"])
            index = info["total"] - info["i"] - 1
            if index % log_every_t == 0 or index == info["total"] - 1:
                intermediates["x_inter"].append(info["x"])
                intermediates["pred_x0"].append(info["x0"])

        self.before_sampling(S, eta)
        samples = sample(self.sampler, denoiser, x, S, eta=eta, callback=on_step,
                         blend=_mask_blend(mask, x0, denoiser.schedule))
        return samples, intermediates

    def before_sampling(self, steps, eta):
        """A hook for the state the original kept between calls (DDIM's schedule)."""


class DDIMSampler(OriginalSampler):
    sampler, label = "ddim", "DDIM"
    ddim_timesteps = None  # set by make_schedule (and by sample), as in the original
    ddim_eta = 0.0

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        if ddim_discretize != "uniform":
            raise ValueError(f"only the 'uniform' DDIM discretisation is supported, not {ddim_discretize!r}")
        self.ddim_timesteps = self.schedule.ddim_timesteps(ddim_num_steps)
        self.ddim_eta = ddim_eta
        if verbose:
            print(f"Selected timesteps for ddim sampler: {self.ddim_timesteps}")

    def before_sampling(self, steps, eta):
        self.make_schedule(steps, ddim_eta=eta, verbose=False)

    def _require_schedule(self):
        if self.ddim_timesteps is None:
            raise RuntimeError("call make_schedule(ddim_num_steps, ddim_eta=...) first")

    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        """x0 noised to DDIM step index t (or model timestep t with use_original_steps); t a number or per sample."""
        t = torch.as_tensor(t).cpu()
        if not use_original_steps:
            self._require_schedule()
            t = torch.as_tensor(self.ddim_timesteps)[t]
        noise = torch.randn_like(x0) if noise is None else noise
        return noise_to_step(self.schedule, x0, t, noise)

    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               callback=None):
        """Denoise through the first t_start DDIM timesteps (img2img), with make_schedule's eta."""
        self._require_schedule()
        denoiser = GuidedDenoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale,
                                  **placement_of(self.model))
        on_step = (lambda info: callback(info["i"])) if callback is not None else None
        return sample_ddim(denoiser, x_latent.float(), self.ddim_timesteps[:t_start], eta=self.ddim_eta,
                           callback=on_step)
