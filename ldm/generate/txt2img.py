"""Text to image: each batch starts from pure noise, [n, C, H/f, W/f], drawn from the run's generator."""
from ldm.generate.hires import HiresSettings, SecondPass, checked_target, infotext_fields as hires_infotext_fields
from ldm.generate.output import OutputFolder
from ldm.generate.progress import StopFlag
from ldm.generate.run import BatchInputs, Job, RunReport, Start, Task, run

Txt2ImgJob = Job  # the settings of a txt2img run are exactly the shared ones


class TextToImage(Task):
    """hires: txt2img's hires fix (ldm.generate.hires), None for none; the job's size is then the first pass's."""

    def __init__(self, hires: HiresSettings | None = None):
        self.hires = hires

    def prepare(self, job, loaded, log):
        loaded.require_kind("txt2img.py", "text-to-image")
        if self.hires is not None:
            self.sizes = checked_target(self.hires, job.height, job.width, loaded.downsampling_factor)

    def start(self, batch: BatchInputs) -> Start:
        second_pass = SecondPass(self.hires, self.sizes, batch) if self.hires is not None else None
        return Start(latents=batch.noise.start_noise(batch.latent_shape), cond=batch.cond, uncond=batch.uncond,
                     second_pass=second_pass)

    def fields(self, job) -> dict:
        return {} if self.hires is None else hires_infotext_fields(self.hires)


def run_txt2img(job: Job, loaded, folder: OutputFolder, log=print, stop: StopFlag | None = None) -> RunReport:
    return run(job, TextToImage(), loaded, folder, log=log, stop=stop)
