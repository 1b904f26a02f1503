"""Runs split between processes and machines under torchrun, and runs that resume (--resume).

torchrun (torch.distributed.run) starts the same command once per device and tells each process its place
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE). Each process makes its share of the run's batches, and
the folder ends up as one process leaves it: the same file names, the same pictures bit for bit, the same
infotexts. That holds because
- a batch's random numbers are known without making the batches before it: in the default seed mode
  image k has its own generator seeded with seed + k; in --seed_mode batch (one generator for the run) a
  process moves the generator past the batches made elsewhere by drawing what they draw (DrawRecorder).
  What a batch draws depends on the run's settings and the batch's size, not on its pictures, so it is
  noted once, from the run's first batch, and replayed for the others: drawing the numbers costs little
  next to the model evaluations they feed;
- rank 0 reserves the run's file numbers before a picture is made and tells the others, so each picture
  gets the number one process gives it; a file another run put on a reserved number first is never
  overwritten (the picture then takes the next free number, as any run's would);
- the grid is made once, by rank 0, from every process's pictures, after all are done.

The manifest (ldm.generate.manifest) notes each picture as it is saved; --resume makes only the batches it
does not list as complete, so a run restarted after a crash (torchrun's --max_restarts, or by hand) ends as
an uninterrupted one would. Without torchrun or --resume none of this runs.
"""
import atexit
import dataclasses
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from ldm.generate import loading
from ldm.generate.errors import UserError
from ldm.generate.manifest import Manifest, ManifestContents
from ldm.generate.output import SaveFailed
from ldm.generate.progress import StopFlag
from ldm.generate.rng import RANDOM_SEED, RunSeeds
from ldm.generate.run import _Run
from ldm.models.diffusion.samplers import REGISTRY

# Processes wait for each other at the start (--seed_mode batch: for rank 0's first batch) and at the end
# (for the slowest share); a batch of a large model on a CPU can outlast torch's default of 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Shard:
    """This process's place in a torchrun launch; the defaults are a run on its own."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, value):
        """rank 0's value, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """On rank 0 every rank's value in rank order; None elsewhere."""
        if not self.distributed:
            return [value]
        everyone = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, everyone, dst=0)
        return everyone

    def decide(self, decision):
        """decision() run on rank 0 and its result given to every rank; a UserError it raises is raised on
        every rank, so that none waits for the others forever."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = ("ok", decision())
            except UserError as error:
                outcome = ("error", str(error))
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise UserError(value)
        return value


def from_environment(environ=os.environ) -> Shard:
    """The Shard torchrun's variables describe; a run on its own without them."""
    if "WORLD_SIZE" not in environ:
        return Shard()
    try:
        world = int(environ["WORLD_SIZE"])
        rank, local_rank = int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers: launch with "
                        "torchrun, which sets them") from None
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise UserError(f"RANK {rank}, LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world}, LOCAL_WORLD_SIZE "
                        f"{local_world}: launch with torchrun, which sets them")
    return Shard(rank, world, local_rank, local_world)


_current = Shard()


def current() -> Shard:
    return _current


def wanted(folder) -> bool:
    """Whether a script's run goes through this module: under torchrun, or with --resume."""
    return _current.distributed or getattr(folder, "resume", False)


def start(args, folder) -> Shard:
    """Under torchrun: join the other processes (gloo on CPUs, NCCL beside it on CUDA), take the CUDA
    device of this local rank, or this rank's share of the CPU's cores. Checks --resume's options."""
    global _current
    shard = from_environment()
    if folder.resume and not folder.save_samples:
        raise UserError("--resume continues from the saved pictures: drop --skip_save")
    manifest = Manifest(folder.outdir)
    if shard.distributed and not folder.resume and manifest.path.exists():
        raise UserError(f"{manifest.path} is there from an earlier run: pass --resume to continue it, or another "
                        "--outdir")
    if shard.distributed and not dist.is_initialized():
        device = loading.resolve_device(args.device)
        if device.type == "cuda":
            if shard.local_world_size > torch.cuda.device_count():
                raise UserError(f"{shard.local_world_size} processes on this machine, {torch.cuda.device_count()} "
                                "CUDA devices: pass torchrun --nproc_per_node at most the number of GPUs")
            device = torch.device("cuda", shard.local_rank if device.index is None else device.index)
            torch.cuda.set_device(device)
            args.device = str(device)
            backend = "cpu:gloo,cuda:nccl"
        else:
            share_cpu_cores(shard)
            backend = "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        # left to the interpreter's teardown, gloo's threads can outlive the group and abort the process
        # (SIGABRT, "terminate called without an active exception") after the run is done
        atexit.register(leave_process_group)
        # torchrun stops the other processes with SIGTERM when one fails: exit through the cleanups, so that
        # a file being written is removed, not left behind as a temporary
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _current = shard
    return shard


def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def share_cpu_cores(shard: Shard):
    """Each local process its share of the physical cores, unless the user set OMP_NUM_THREADS (torchrun
    sets it to 1 where it is unset, so that 1 counts as the user's only when torchrun was started with it)."""
    if threads_set_by_user():
        return
    threads = max(1, loading.physical_cores() // shard.local_world_size)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # loading.use_physical_cores then leaves it so
    torch.set_num_threads(threads)


def threads_set_by_user() -> bool:
    value = os.environ.get("OMP_NUM_THREADS")
    if value != "1":
        return value is not None
    try:  # the launcher's environment as it was started (/proc shows it before torchrun's change)
        launcher = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\0")
    except OSError:  # no /proc: take the 1 for torchrun's
        return False
    return b"OMP_NUM_THREADS=1" in launcher


# --- --seed_mode batch: one generator for the run ----------------------------------------------------------
class DrawRecorder:
    """A noise source (ldm.generate.rng) that notes what is drawn from it: ("randn", shape) and ("seeds",)."""

    def __init__(self, source):
        self.source, self.draws = source, []

    def randn(self, shape):
        self.draws.append(("randn", list(shape)))
        return self.source.randn(shape)

    def brownian_seeds(self, batch_size: int):
        self.draws.append(("seeds", [batch_size]))
        return self.source.brownian_seeds(batch_size)

    def seeded_normal(self, shape, seed: int):  # a fresh generator: the run's is not drawn from
        return self.source.seeded_normal(shape, seed)

    def pattern(self, batch_size: int) -> list:
        """The draws, each with the batch's size taken out of its shape, as [kind, shape, repeats] runs."""
        runs = []
        for kind, shape in self.draws:
            if shape[0] != batch_size:
                raise RuntimeError(f"a draw of shape {shape} in a batch of {batch_size}: its draws cannot be "
                                   "replayed for a batch of another size")
            if runs and runs[-1][:2] == [kind, shape[1:]]:
                runs[-1][2] += 1
            else:
                runs.append([kind, shape[1:], 1])
        return runs


def replay(pattern: list, batch_size: int, source):
    """Draw from `source` what a batch of `batch_size` with this pattern draws."""
    for kind, shape, repeats in pattern:
        for _ in range(repeats):
            if kind == "randn":
                source.randn([batch_size, *shape])
            else:
                source.brownian_seeds(batch_size)


def check_replayable(job):
    """--seed_mode batch can be split and resumed when what a batch draws does not depend on its pictures."""
    if job.seed_mode != "batch":
        return
    if job.fixed_code:
        raise UserError("--fixed_code with --seed_mode batch cannot be split between processes or resumed: drop "
                        "one of them (--fixed_code in the default seed mode can)")
    info = REGISTRY[job.sampler]
    if info.adaptive and info.stochastic and job.sampler_options.eta != 0:
        raise UserError(f"{info.display_name} picks its steps from the pictures, so with --seed_mode batch its "
                        "noise cannot be replayed in another process: pass --eta 0, another sampler, or drop "
                        "--seed_mode batch")


# --- the run ------------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where each batch's pictures stand in the run: batch number -> prompts and first picture's index."""
    prompts: dict
    first_image: dict
    images: int

    @classmethod
    def of(cls, job) -> "Layout":
        prompts, first, count = {}, {}, 0
        for iteration in range(job.n_iter):
            for batch_index, batch in enumerate(job.batches):
                number = iteration * len(job.batches) + batch_index + 1
                prompts[number], first[number] = batch, count
                count += len(batch)
        return cls(prompts, first, count)

    def indices(self, number: int) -> range:
        return range(self.first_image[number], self.first_image[number] + len(self.prompts[number]))


def same_picture(path, image: np.ndarray, text: str) -> bool:
    """Whether the PNG at `path` is this picture with this infotext."""
    try:
        with Image.open(path) as saved:
            return saved.text.get("parameters") == text and np.array_equal(np.asarray(saved.convert("RGB")), image)
    except (OSError, ValueError, SyntaxError):
        return False


class ShardedRun(_Run):
    """This process's share of a run that notes its pictures in the manifest (see the module's docstring)."""

    def __init__(self, job, task, loaded, folder, log, stop, shard: Shard):
        check_replayable(job)
        self.shard = shard
        self.manifest = Manifest(folder.outdir) if folder.save_samples else None
        found = self.manifest.read() if self.manifest and shard.rank == 0 and folder.resume else ManifestContents()
        seed, subseed = shard.decide(lambda: agreed_seeds(job, found.run))
        if job.seed == RANDOM_SEED and found.run is None and shard.rank == 0:
            log(f"--seed -1: the random seed {seed} (--seed {seed} makes this run again)")
        job = dataclasses.replace(job, seed=seed, subseed=job.subseed if subseed is None else subseed)
        super().__init__(job, task, loaded, folder, log if shard.rank == 0 else (lambda line: None), stop)
        self.log = log
        self.layout = Layout.of(job)
        plan = shard.decide(lambda: self.plan(found))
        self.first_number, self.draws, self.complete = plan["first_number"], plan["draws"], set(plan["complete"])
        todo = [number for number in self.layout.prompts if number not in self.complete]
        self.mine = todo[shard.rank::shard.world_size]
        self.recorder, self.position = None, 1  # in batch mode: the batch the generator stands at the start of
        if job.seed_mode == "batch":
            self.recorder = DrawRecorder(self.noise.batch_source)
            self.noise.batch_source = self.recorder
        self.learning = self.recorder is not None and self.draws is None and bool(todo)
        self.current_number = self.current_first = 0
        self.made, self.grid_indices = 0, []

    def fingerprint(self) -> str:
        """What must not change between a run and its resumption: prompts, seeds, settings, model."""
        job, first_batch = self.job, self.job.batches[0]
        fields = self.fields(len(first_batch), 0)
        described = json.dumps([job.batches, job.n_iter, job.negative_prompt, fields], default=str)
        return hashlib.sha256(described.encode()).hexdigest()[:16]

    def plan(self, found: ManifestContents) -> dict:
        """Rank 0: the run's file numbers, the batches already complete, the draws of a batch; the manifest
        rewritten to hold what is kept."""
        fingerprint = self.fingerprint()
        if found.run is not None and found.run.get("fingerprint") != fingerprint:
            raise UserError(f"{self.manifest.path} is from a run with other prompts, seeds, settings or model: "
                            "pass that run's options to continue it, or another --outdir")
        run = found.run or {"fingerprint": fingerprint, "first_number": self.folder.next_sample_number(),
                            "images": self.layout.images, "batches": len(self.layout.prompts),
                            "seed": self.seeds.seed, "subseed": self.seeds.subseed}
        pictures = {record["image"]: record for record in found.pictures if self.still_there(record)}
        draws = found.draws
        complete = []
        if self.job.seed_mode != "batch" or draws is not None:  # without the draws the generator cannot skip
            complete = [n for n in self.layout.prompts if all(i in pictures for i in self.layout.indices(n))]
        self.kept = [pictures[i] for n in complete for i in self.layout.indices(n)]
        if self.manifest is not None:
            self.manifest.rewrite(ManifestContents(run, draws, self.kept))
        return {"first_number": run["first_number"], "draws": draws, "complete": complete}

    def still_there(self, record: dict) -> bool:
        """Whether a manifest line stands for a picture of this run that needs no making: its file, in the
        samples folder, is there, or it came out NaN."""
        if not isinstance(record.get("image"), int) or not 0 <= record["image"] < self.layout.images:
            return False
        file = record.get("file")
        if not isinstance(file, str):
            return bool(record.get("failed"))
        return file.startswith("samples/") and "/" not in file[8:] and (self.folder.outdir / file).is_file()

    def numbered_batches(self):
        if self.learning and self.shard.rank != 0:  # wait for rank 0's first batch to say what a batch draws
            self.learning = False
            self.draws = self.shard.broadcast(None)
            if self.draws is None:  # rank 0 stopped in it
                return
        for number in self.mine:
            self.move_generator_to(number)
            self.current_number, self.current_first = number, self.layout.first_image[number]
            self.images_before = self.current_first
            yield number, self.layout.prompts[number]

    def move_generator_to(self, number: int):
        """Batch mode: the generator as it stands at the start of batch `number` in one process."""
        if self.recorder is None:
            return
        while self.position < number:
            replay(self.draws, len(self.layout.prompts[self.position]), self.recorder.source)
            self.position += 1

    def one_batch(self, prompts, number):
        if self.recorder is None:
            return super().one_batch(prompts, number)
        self.recorder.draws.clear()
        drawn = None
        try:
            super().one_batch(prompts, number)
            drawn = self.recorder.pattern(len(prompts))
        finally:
            if self.learning:  # rank 0's first batch: what every batch draws, for the others and for --resume
                self.learning = False
                self.draws = self.shard.broadcast(drawn)
                if drawn is not None and self.manifest is not None:
                    self.manifest.append({"draws": drawn})
        if drawn != self.draws:
            raise RuntimeError(f"batch {number} drew {drawn}, the first batch {self.draws}: what a batch draws "
                               "depends on more than its size here, so --seed_mode batch cannot be split")
        self.position = number + 1

    def save(self, image, decoded_image, prompt, label, batch_size, position):
        failed, grid = len(self.report.failed), len(self.grid_images)
        super().save(image, decoded_image, prompt, label, batch_size, position)
        index = self.current_first + position
        if len(self.grid_images) > grid:
            self.grid_indices.append(index)
        made = len(self.report.failed) == failed
        self.made += made
        if self.manifest is None:
            return
        fields = self.fields(batch_size, position)
        record = {"batch": self.current_number, "image": index, "prompt": prompt, "seed": fields["Seed"]}
        if "Variation seed" in fields:
            record["subseed"] = fields["Variation seed"]
        if made:
            record["file"] = self.report.saved[-1].relative_to(self.folder.outdir).as_posix()
        else:
            record.update(file=None, failed="NaN")
        record["rank"] = self.shard.rank
        self.manifest.append(record)

    def save_sample(self, image, text, position):
        """The picture under its reserved number; kept as it is when this run saved it there before a crash
        kept it out of the manifest."""
        reserved = self.folder.sample_path(self.first_number + self.current_first + position)
        if reserved.is_file() and same_picture(reserved, image, text):
            return reserved
        saved = self.folder.save_sample(image, text, self.first_number + self.current_first + position)
        if saved != reserved:
            self.log(f"warning: {reserved.name}, reserved for this run, was taken by another; saved as {saved.name}")
        return saved

    def save_grid(self):
        """Made by finish(), once every process is done."""

    def finish(self) -> list | None:
        """Every rank's outcome, on rank 0 (None elsewhere); rank 0 makes the grid when every batch is done."""
        report, job = self.report, self.job
        outcome = {"made": self.made, "failed": len(report.failed), "interrupted": report.interrupted,
                   "save_failed": report.save_failed, "rank": self.shard.rank,
                   "grid": list(zip(self.grid_indices, self.grid_images)) if job.save_grid else []}
        everyone = self.shard.gather(outcome)
        if everyone is None:
            return None
        if job.save_grid and not any(o["interrupted"] or o["save_failed"] for o in everyone):
            pictures = {index: image for o in everyone for index, image in o["grid"]}
            for record in getattr(self, "kept", []):
                if record.get("file"):
                    with Image.open(self.folder.outdir / record["file"]) as saved:
                        pictures[record["image"]] = np.asarray(saved.convert("RGB"))
            self.grid_images = [pictures[index] for index in sorted(pictures)]
            self.grid_network_fields = self.networks.for_batch(job.batches[0], job.negative_prompt).infotext_fields()
            try:
                _Run.save_grid(self)
            except SaveFailed as error:
                report.save_failed = str(error)
                everyone[0]["save_failed"] = str(error)
        return everyone


def agreed_seeds(job, run: dict | None) -> tuple[int, int | None]:
    """Rank 0: the run's seed and variation seed, -1 resolved (to the manifest's when resuming)."""
    seed, subseed = job.seed, job.subseed
    if run is not None:
        seed = run["seed"] if seed == RANDOM_SEED else seed
        subseed = run["subseed"] if subseed == RANDOM_SEED and run.get("subseed") is not None else subseed
    resolved = RunSeeds.resolve(seed, subseed, job.subseed_strength)
    return resolved.seed, resolved.subseed


def run_and_report(job, task, loaded, folder) -> int:
    """run.run_and_report for a sharded or resumed run: rank 0 prints the summary for all; the exit status
    is 130 when a process was interrupted, 1 when a picture failed or a file could not be written."""
    shard = current()
    stop = StopFlag()
    this_run = ShardedRun(job, task, loaded, folder, print, stop, shard)
    with stop.catching_sigint():
        try:
            this_run.all_batches()
        except KeyboardInterrupt:  # a second Ctrl-C stops at once
            this_run.report.interrupted = "once by a second Ctrl-C"
    everyone = this_run.finish()
    if everyone is None:  # not rank 0: its errors are its own to say
        report = this_run.report
        if report.save_failed:
            print(f"error: {report.save_failed}", file=sys.stderr)
        return 1 if report.save_failed or report.failed else 130 if report.interrupted else 0
    return summarize(everyone, this_run, folder, shard)


def summarize(everyone: list, this_run: ShardedRun, folder, shard: Shard) -> int:
    made, failed = sum(o["made"] for o in everyone), sum(o["failed"] for o in everyone)
    skipped = sum(len(this_run.layout.prompts[number]) for number in this_run.complete)
    where = f"files in {folder.samples}" if folder.save_samples else "no single images (--skip_save)"
    grid = f", grid {this_run.report.grid}" if this_run.report.grid else ""
    processes = f" by {shard.world_size} processes" if shard.distributed else ""
    counts = f"{made} images made{processes}, {skipped} skipped (complete before), {failed} failed; {where}{grid}"
    for outcome in everyone:
        if outcome["save_failed"]:
            print(f"error: rank {outcome['rank']}: {outcome['save_failed']}", file=sys.stderr)
    interrupted = [o for o in everyone if o["interrupted"]]
    if any(o["save_failed"] for o in everyone):
        print(f"stopped: {counts}", file=sys.stderr)
        return 1
    if interrupted:
        print(f"interrupted at {interrupted[0]['interrupted']}: {counts} (--resume makes the rest)", file=sys.stderr)
        return 130
    print(f"done: {counts}")
    return 1 if failed else 0
