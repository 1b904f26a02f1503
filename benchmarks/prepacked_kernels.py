"""Guided UNet calls with the deepest kernels prepacked (our default) and without, on one random SD 1.x checkpoint.

    python benchmarks/prepacked_kernels.py --sizes 256 512 --calls 5 --rounds 2

Each way runs in a fresh process (a process is where the packed copies live and where their fresh memory is
first written) that loads the UNet as `load_model` places it and times --calls guided calls (batch 2) in a row;
the ways alternate, --rounds times, so a busy neighbour slows both alike. "plain" sets PACKED_MAX_ROWS to 0.
Printed: every call (the packed way pays for packing at call PACK_FROM_CALL with a shape), the median of the
calls after it, their ratio, the packed copies' size and the process's peak resident memory, and whether both
ways gave the same output bit for bit.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402

from ldm.modules.diffusionmodules.util import PACK_FROM_CALL  # noqa: E402
from step_vs_openvino import step_inputs  # noqa: E402

WAYS = ("plain", "prepacked")


def child(args):
    common.use_our_process_settings()
    from ldm.checkpoint import load_model
    from ldm.modules.diffusionmodules import util

    if args.child == "plain":
        util.PACKED_MAX_ROWS = 0
    unet = load_model(common.sd1_checkpoint(args.workdir), common.SD1_CONFIG, "cpu", torch.float32,
                      log=lambda line: None).model.model.diffusion_model
    latent, timesteps, context = step_inputs(args.size)
    seconds = []
    for _ in range(args.calls):
        start = time.perf_counter()
        with torch.inference_mode():
            output = unet(latent, timesteps, context)
        seconds.append(time.perf_counter() - start)
    torch.save(output, args.workdir / f"prepacked-kernels-{args.child}-{args.size}.pt")
    packed = sum(kernel.numel() * kernel.element_size() for kernel in util.packed_kernels(unet).values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "packed": packed, "peak": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR, help="where the checkpoint is kept")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--calls", type=int, default=8, help="calls a process (more than PACK_FROM_CALL)")
    parser.add_argument("--rounds", type=int, default=2)
    args = common.parse_with_children(parser, WAYS, child)
    if args is None:
        return
    common.sd1_checkpoint(args.workdir)
    table = []
    for size in args.sizes:
        runs = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                command = [sys.executable, __file__, "--child", way, "--size", str(size), "--calls", str(args.calls),
                           "--workdir", str(args.workdir)]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[way].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"{size}² {way}: " + " ".join(f"{s:.2f}" for s in runs[way][-1]["seconds"]) + " s", flush=True)
        steady = {way: statistics.median(s for run in runs[way] for s in run["seconds"][PACK_FROM_CALL:])
                  for way in WAYS}
        outputs = [torch.load(args.workdir / f"prepacked-kernels-{way}-{size}.pt") for way in WAYS]
        last = runs["prepacked"][-1]
        table.append(f"| {size}² | {steady['plain']:.2f} s | {steady['prepacked']:.2f} s | "
                     f"{steady['prepacked'] / steady['plain']:.2f} | {last['packed'] / 1e9:.2f} GB | "
                     f"{runs['plain'][-1]['peak'] / 1e9:.2f} / {last['peak'] / 1e9:.2f} GB | "
                     f"{torch.equal(*outputs)} |")
    print(f"\n| size | plain, after call {PACK_FROM_CALL} | prepacked | ÷ | packed copies | peak RSS plain / prepacked "
          "| same output |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
