"""DDPM and LatentDiffusion: the noise schedule, the denoiser call, conditioning, and the training loss.

Plain nn.Modules (inference never imports Lightning); `ldm.training` wraps them for Lightning training.
The model-family variants live in `ddpm_variants` (inpainting, x4 upscaling) and `ddpm_depth`, and are
resolved from here (bottom) so that the original YAML targets `ldm.models.diffusion.ddpm.<Class>` work.
"""
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, schedule_tensors
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import batch_images_to_bchw, instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Routes the conditioning to the UNet: cross-attention context, channel concatenation, or class labels."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None, control=None):
        """control: a ControlNet's residuals for the UNet (ldm.generate.control), None for none."""
        key = self.conditioning_key
        if key in ("concat", "hybrid", "hybrid-adm"):
            x = torch.cat([x] + list(c_concat), dim=1)
        with_text = key in ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm")
        context = torch.cat(list(c_crossattn), dim=1) if with_text else None
        labels = c_adm if key in ("hybrid-adm", "crossattn-adm") else (c_crossattn[0] if key == "adm" else None)
        if control is None:
            return self.diffusion_model(x, t, context=context, y=labels)
        return self.diffusion_model(x, t, context=context, y=labels, control=control)


class DDPM(nn.Module):
    def __init__(
        self,
        unet_config,
        timesteps=1000,
        beta_schedule="linear",
        linear_start=1e-4,
        linear_end=2e-2,
        cosine_s=8e-3,
        given_betas=None,
        parameterization="eps",
        conditioning_key=None,
        first_stage_key="image",
        image_size=256,
        channels=3,
        use_ema=True,
        ema_decay=0.9999,
        l_simple_weight=1.0,
        loss_type="l2",
        ucg_training=None,
        scheduler_config=None,
        ckpt_path=None,
        monitor=None,
        **ignored,  # training-logger options of the originals (log_every_t, clip_denoised, ...)
    ):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be eps, x0 or v, not {parameterization!r}")
        if ckpt_path is not None:
            raise ValueError("ckpt_path inside a config is not supported: pass the checkpoint to the loader")
        self.parameterization = parameterization
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.ucg_training = dict(ucg_training or {})
        self.scheduler_config = scheduler_config
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)

    def register_schedule(self, given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s):
        betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else \
            make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end
        for name, value in schedule_tensors(betas).items():
            self.register_buffer(name, value)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior = {
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, value in posterior.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device="cpu"))

    # --- the forward process and the parameterisations -------------------------------------------------
    def q_sample(self, x_start, t, noise):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x, noise, t):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def predict_start_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    # --- training -----------------------------------------------------------------------------------------
    def apply_model(self, x_noisy, t, cond=None):
        return self.model(x_noisy, t)

    def loss_target(self, x_start, noise, t):
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def p_losses(self, x_start, cond, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        target = self.loss_target(x_start, noise, t)
        if self.loss_type == "l2":
            loss = F.mse_loss(model_output.float(), target.float())
        elif self.loss_type == "l1":
            loss = F.l1_loss(model_output.float(), target.float())
        else:
            raise ValueError(f"loss_type must be l1 or l2, not {self.loss_type!r}")
        return self.l_simple_weight * loss, {"loss_simple": loss.detach()}

    def drop_conditioning(self, batch):
        """Classifier-free guidance training: replace each caption by its null value with probability p."""
        for key, setting in self.ucg_training.items():
            batch[key] = [setting["val"] if random.random() < setting["p"] else value for value in batch[key]]
        return batch

    def get_input(self, batch, key):
        return batch_images_to_bchw(batch[key])

    def training_loss(self, batch):
        x = self.get_input(self.drop_conditioning(batch), self.first_stage_key)
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device)
        return self.p_losses(x, None, t)

    def trainable_parameters(self):
        return list(self.model.parameters())

    def update_ema(self):
        if self.use_ema:
            self.model_ema(self.model)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen autoencoder, conditioned on a text encoder."""

    def __init__(
        self,
        first_stage_config,
        cond_stage_config,
        cond_stage_key="image",
        cond_stage_trainable=False,
        conditioning_key=None,
        scale_factor=1.0,
        scale_by_std=False,
        num_timesteps_cond=None,
        **kwargs,
    ):
        if scale_by_std:
            raise ValueError("scale_by_std is not supported: set scale_factor explicitly (0.18215 for SD)")
        if num_timesteps_cond not in (None, 1):
            raise ValueError("num_timesteps_cond > 1 (shortened conditioning schedules) is not supported")
        if conditioning_key is None:
            conditioning_key = "concat" if kwargs.get("concat_mode", True) is False else "crossattn"
        kwargs.pop("concat_mode", None)
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.scale_factor = scale_factor
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        for p in self.first_stage_model.parameters():
            p.requires_grad_(False)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if not cond_stage_trainable:
            self.cond_stage_model.eval()
            for p in self.cond_stage_model.parameters():
                p.requires_grad_(False)

    def train(self, mode=True):
        """The first stage (and a frozen text encoder) stay in eval mode even while the UNet trains."""
        super().train(mode)
        self.first_stage_model.eval()
        if not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # --- conditioning and the first stage ------------------------------------------------------------------
    def get_learned_conditioning(self, c):
        encode = getattr(self.cond_stage_model, "encode", None)
        c = encode(c) if callable(encode) else self.cond_stage_model(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator=None):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator)
        else:
            z = encoder_posterior
        return self.scale_factor * z

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy, t, cond):
        """cond: a tensor or list of tensors (routed by conditioning_key), or a dict of c_concat/c_crossattn/c_adm."""
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            cond = {("c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"): cond}
        return self.model(x_noisy, t, **cond)

    # --- training -----------------------------------------------------------------------------------------
    def training_loss(self, batch):
        batch = self.drop_conditioning(batch)
        with torch.no_grad():
            x = self.get_input(batch, self.first_stage_key)
            z = self.get_first_stage_encoding(self.encode_first_stage(x))
        captions = batch[self.cond_stage_key]
        if self.cond_stage_trainable:
            c = self.get_learned_conditioning(captions)
        else:
            with torch.no_grad():
                c = self.get_learned_conditioning(captions)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device)
        return self.p_losses(z, c, t)

    def trainable_parameters(self):
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return params
