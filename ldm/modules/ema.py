import torch
from torch import nn


class LitEma(nn.Module):
    """Exponential moving average of a model's trainable parameters.

    Stored as buffers named after the parameters with the dots removed (`model_ema.diffusion_modelout2weight`),
    the layout of the original checkpoints, plus `decay` and `num_updates`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("EMA decay must be between 0 and 1")
        self.shadow_names = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                shadow_name = ema_name(name)
                self.shadow_names[name] = shadow_name
                self.register_buffer(shadow_name, p.detach().clone())

    @torch.no_grad()
    def forward(self, model: nn.Module):
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            # Warm-up: early averages forget quickly, so a short training run still has a useful EMA.
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.shadow_names:
                shadow = shadows[self.shadow_names[name]]
                shadow.sub_((1.0 - decay) * (shadow - p.detach().to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.shadow_names:
                p.copy_(shadows[self.shadow_names[name]])


def ema_name(parameter_name: str) -> str:
    return parameter_name.replace(".", "")
