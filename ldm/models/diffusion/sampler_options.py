"""A1111's sampler parameters: eta (its "eta_ancestral"), s_churn, s_tmin, s_tmax and s_noise.

As A1111 does (sd_samplers_common.Sampler.initialize), a sampler function gets each parameter its
signature names, always, with the value asked for; the infotext names the ones that differ from A1111's
defaults. A parameter changed from its default for a sampler that does not take it is refused rather than
ignored, so that a setting never silently does nothing. DDIM's eta is a different setting (A1111's
"eta_ddim", written "Eta DDIM"), passed to `samplers.sample` as `eta`.
"""
import inspect
import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class SamplerOptions:
    """The values A1111 passes; the defaults are A1111's."""
    eta: float = 1.0  # the fresh noise of the ancestral and SDE samplers, as a fraction of the full amount
    s_churn: float = 0.0  # Karras' churn: how much noise Euler, Heun and DPM2 add back at each step
    s_tmin: float = 0.0  # the sigma range in which churn applies
    s_tmax: float = math.inf
    s_noise: float = 1.0  # the scale of the fresh noise added (churn, ancestral, SDE)

    def changed(self) -> dict:
        """{name: value} of the options that differ from their defaults, in declaration order."""
        defaults = asdict(SamplerOptions())
        return {name: value for name, value in asdict(self).items() if value != defaults[name]}


INFOTEXT_NAMES = {"eta": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax",
                  "s_noise": "Sigma noise"}  # as A1111 writes them


def taken_by(function) -> list[str]:
    """The options `function`'s signature takes, in declaration order; none for a sampler without a function."""
    if function is None:
        return []
    parameters = inspect.signature(function).parameters
    return [option.name for option in fields(SamplerOptions) if option.name in parameters]


def arguments_for(function, options: SamplerOptions) -> dict:
    """The keyword arguments `function` gets: every option it takes, default or not."""
    return {name: getattr(options, name) for name in taken_by(function)}


def unused_by(function, options: SamplerOptions) -> list[str]:
    """The options changed from their defaults that `function` does not take."""
    taken = taken_by(function)
    return [name for name in options.changed() if name not in taken]


def infotext_fields(function, options: SamplerOptions) -> dict:
    """A1111's fields for the options `function` takes that differ from their defaults."""
    taken = taken_by(function)
    return {INFOTEXT_NAMES[name]: value for name, value in options.changed().items() if name in taken}
