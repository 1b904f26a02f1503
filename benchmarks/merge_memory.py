"""Peak memory of scripts/merge_checkpoints.py merging three SD 1.x-size checkpoints, against their size.

Writes three random-weight fp16 checkpoints in the original SD 1.x key layout (tests/data/keys/v1.tsv,
about 2 GB each) into --workdir, streamed with our own writer so that making them holds one tensor at a
time; then runs the merger as a child process per case and reports its peak resident set size
(ru_maxrss: the file pages it has mapped and read count too). Cases: three .safetensors files
(add_difference), and A as a zip .ckpt pickle (torch.load's memory map). The files are deleted afterwards
unless --keep.

    python benchmarks/merge_memory.py [--workdir /tmp/ldm-merge-bench] [--keep]
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from ldm.checkpoint import REPO_ROOT  # noqa: E402
from ldm.safetensors_writer import PlannedTensor, StreamingWriter  # noqa: E402

KEYS = REPO_ROOT / "tests" / "data" / "keys" / "v1.tsv"
SCRIPT = REPO_ROOT / "scripts" / "merge_checkpoints.py"


def sd1_layout() -> list:
    """(name, shape) of every tensor of the original SD 1.x checkpoint."""
    layout = []
    for line in KEYS.read_text().splitlines():
        name, shape, _dtype, _kind = line.split("\t")
        layout.append((name, tuple(int(size) for size in shape.strip("[]").split(",") if size.strip())))
    return layout


def random_tensor(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).mul_(0.02).half()


def write_random_safetensors(path: Path, seed: int) -> None:
    layout = sd1_layout()
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        writer = StreamingWriter(f, [PlannedTensor(name, torch.float16, shape) for name, shape in layout])
        for entry in writer.order:
            writer.write(entry.name, random_tensor(entry.shape, generator))
        writer.finish()


def write_random_pickle(path: Path, seed: int) -> None:
    """A zip .ckpt as torch.save writes it (this needs the state dict whole in memory, once)."""
    generator = torch.Generator().manual_seed(seed)
    torch.save({"state_dict": {name: random_tensor(shape, generator) for name, shape in sd1_layout()}}, path)


# Runs a script and, at its exit, writes the process's peak resident set size (VmHWM, kept per address
# space, so that it does not inherit this parent's as ru_maxrss would across fork and exec) to stderr.
PEAK_REPORTER = """
import atexit, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    sys.stderr.write(f"peak-rss-kib {peak}\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def peak_rss_of(command: list) -> tuple[int, float]:
    """(peak resident bytes, seconds) of the Python script run by `command` ([script, arguments...])."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_REPORTER, *command], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    if result.returncode != 0 or not lines or not lines[-1].startswith("peak-rss-kib "):
        raise SystemExit(f"the merge failed: {result.stderr.strip() or result.stdout.strip()}")
    return int(lines[-1].split()[1]) * 1024, elapsed


def result_line(out: Path) -> str:
    return f"output {out.name}: {out.stat().st_size / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-merge-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints and the merges")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = {label: args.workdir / f"{label}.safetensors" for label in "abc"}
    try:
        for seed, (label, path) in enumerate(paths.items()):
            if not path.is_file():
                write_random_safetensors(path, seed)
        pickle_a = args.workdir / "a.ckpt"
        if not pickle_a.is_file():
            write_random_pickle(pickle_a, 0)
        inputs = sum(path.stat().st_size for path in paths.values())
        print(f"inputs: 3 SD 1.x-size fp16 checkpoints, {inputs / 2**30:.2f} GiB together")
        cases = {"3 x .safetensors, add_difference": paths["a"], "A as a zip .ckpt, add_difference": pickle_a}
        for case, a in cases.items():
            out = args.workdir / "merged.safetensors"
            command = [str(SCRIPT), "--a", str(a), "--b", str(paths["b"]), "--c", str(paths["c"]),
                       "--method", "add_difference", "--multiplier", "0.5", "--out", str(out), "--overwrite"]
            peak, seconds = peak_rss_of(command)
            print(f"{case}: peak RSS {peak / 2**30:.2f} GiB = {peak / inputs:.1%} of the inputs' size, {seconds:.0f} s")
            print(f"  {result_line(out)}")
        baseline, _ = peak_rss_of([str(SCRIPT), "--help"])
        print(f"for reference, the script's imports alone (--help) peak at {baseline / 2**30:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
