"""Does torch.compile pay for the UNet on a CPU? Compile time against the time it saves per step.

    python benchmarks/compile.py [--size 256] [--repeats 3] [--no-freezing]

Compiles our SD 1.x UNet (random full-size weights, the checkpoint benchmarks/load.py writes) with
inductor, by default with `freezing` (weights folded in as constants and prepacked for oneDNN: the CPU
setting inductor's documentation advises for inference), and prints: the first compiled call (compile +
one call; a second run of this script finds inductor's on-disk cache warm), eager and compiled batch-2
UNet calls alternating (median of --repeats), the relative difference of their outputs, the resident
memory after each phase, and how many steps of this size it takes to win the compile time back.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from ldm.checkpoint import load_model  # noqa: E402


def resident_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-freezing", dest="freezing", action="store_false")
    args = parser.parse_args()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = args.freezing
    print(f"{common.use_our_process_settings()}, freezing: {args.freezing}", flush=True)
    model = load_model(common.sd1_checkpoint(args.workdir, "fp32"), common.SD1_CONFIG, log=lambda m: None).model
    unet = model.model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, args.size // 8, args.size // 8, generator=generator)
    context, timesteps = torch.randn(2, 77, 768, generator=generator), torch.tensor([500, 500])
    with torch.inference_mode():
        expected = unet(latent, timesteps, context)
        print(f"loaded, one eager call made: resident {resident_gb():.2f} GB", flush=True)
        compiled = torch.compile(unet)
        start = time.perf_counter()
        output = compiled(latent, timesteps, context)
        compile_seconds = time.perf_counter() - start
        print(f"first compiled call: {compile_seconds:.1f} s, resident {resident_gb():.2f} GB", flush=True)
        times = common.alternate({"eager": lambda: unet(latent, timesteps, context),
                                  "compiled": lambda: compiled(latent, timesteps, context)}, args.repeats)
    eager, fast = times["eager"], times["compiled"]
    difference = ((output - expected).norm() / expected.norm()).item()
    saved = eager - fast
    payback = f"{(compile_seconds - fast) / saved:.0f} steps" if saved > 0 else "never"
    print(f"{args.size}x{args.size}, median of {args.repeats}: eager {eager:.2f} s, compiled {fast:.2f} s "
          f"(ratio {fast / eager:.2f}); outputs differ by {difference:.1e} (relative); the compile time is won back "
          f"after {payback}; resident {resident_gb():.2f} GB")


if __name__ == "__main__":
    main()
