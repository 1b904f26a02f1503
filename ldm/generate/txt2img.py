"""Text to image: each batch starts from pure noise, [n, C, H/f, W/f], drawn from the run's generator."""
from ldm.generate.output import OutputFolder
from ldm.generate.progress import StopFlag
from ldm.generate.run import BatchInputs, Job, RunReport, Start, Task, run

Txt2ImgJob = Job  # the settings of a txt2img run are exactly the shared ones


class TextToImage(Task):
    def prepare(self, job, loaded, log):
        loaded.require_kind("txt2img.py", "text-to-image")

    def start(self, batch: BatchInputs) -> Start:
        return Start(latents=batch.noise.randn(batch.latent_shape), cond=batch.cond, uncond=batch.uncond)


def run_txt2img(job: Job, loaded, folder: OutputFolder, log=print, stop: StopFlag | None = None) -> RunReport:
    return run(job, TextToImage(), loaded, folder, log=log, stop=stop)
