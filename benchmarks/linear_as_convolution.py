"""Linear layers as 1×1 convolutions on a CPU: the SD 1.x UNet's linear shapes and whole UNet calls, both ways.

    python benchmarks/linear_as_convolution.py [--sizes 256 512] [--repeats 3]

ldm's `Linear` (ldm/modules/diffusionmodules/util.py) runs fp32 CPU inference through oneDNN's 1×1
convolution instead of the MKL matmul behind F.linear. This script shows when that pays, on this machine:
1. every distinct linear shape of one batch-2 UNet call at each size (rows × in -> out, counted with forward
   hooks), timed both ways alternately (median of --repeats), as GFLOP/s, with the path `Linear` takes;
2. whole UNet calls alternating F.linear everywhere and `Linear` as shipped,
   median of --repeats, with the relative difference of the outputs (fp32 summation order only).
Both run in one process with our scripts' settings (threads = physical cores, freed memory kept for reuse).
The UNet has the SD 1.x architecture with the random weights of the checkpoint benchmarks/load.py writes.
"""
import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.checkpoint import load_model  # noqa: E402
from ldm.modules.diffusionmodules.util import Linear  # noqa: E402


@contextlib.contextmanager
def linear_limits(min_rows: int, max_in_features: int):
    """Linear's rule for taking the convolution, changed for the block (1 << 62, any) = never; (0, 1 << 62) = always."""
    saved = Linear.MIN_ROWS, Linear.MAX_IN_FEATURES
    Linear.MIN_ROWS, Linear.MAX_IN_FEATURES = min_rows, max_in_features
    try:
        yield
    finally:
        Linear.MIN_ROWS, Linear.MAX_IN_FEATURES = saved


NEVER, ALWAYS = (1 << 62, 0), (0, 1 << 62)


def unet_call(unet, size: int):
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([500, 500])
    return lambda: unet(latent, timesteps, context)


def linear_shapes(unet, call) -> Counter:
    """(rows, in, out) of every linear layer call in one UNet call, with how often each occurs."""
    shapes = Counter()
    hooks = [module.register_forward_hook(
        lambda module, inputs, output: shapes.update([(inputs[0].numel() // module.in_features, module.in_features,
                                                      module.out_features)]))
        for module in unet.modules() if isinstance(module, Linear)]
    call()
    for hook in hooks:
        hook.remove()
    return shapes


def shape_table(shapes: Counter, repeats: int) -> list[str]:
    lines = ["| rows × in -> out | calls | F.linear (MKL) | 1×1 convolution | Linear takes |",
             "|---|---|---|---|---|"]
    for (rows, inputs, outputs), calls in sorted(shapes.items()):
        x, layer = torch.randn(rows, inputs), Linear(inputs, outputs)
        takes_matmul = rows < Linear.MIN_ROWS or inputs > Linear.MAX_IN_FEATURES
        with linear_limits(*ALWAYS):
            times = common.alternate({"matmul": lambda: F.linear(x, layer.weight, layer.bias),
                                      "convolution": lambda: layer(x)}, repeats)
        flops = 2 * rows * inputs * outputs
        lines.append(f"| {rows} × {inputs} -> {outputs} | {calls} | {flops / times['matmul'] / 1e9:.0f} GFLOP/s | "
                     f"{flops / times['convolution'] / 1e9:.0f} GFLOP/s | {'matmul' if takes_matmul else 'convolution'} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(common.use_our_process_settings(), flush=True)
    model = load_model(common.sd1_checkpoint(args.workdir, "fp32"), common.SD1_CONFIG, log=lambda m: None).model
    unet = model.model.diffusion_model
    with torch.inference_mode():
        for size in args.sizes:
            call = unet_call(unet, size)
            print(f"\n{size}x{size}, the linear layers of one batch-2 UNet call:")
            print("\n".join(shape_table(linear_shapes(unet, call), args.repeats)), flush=True)

            def with_matmul():
                with linear_limits(*NEVER):
                    return call()

            times = common.alternate({"F.linear everywhere": with_matmul, "Linear as shipped": call}, args.repeats)
            difference = (call() - with_matmul()).norm() / with_matmul().norm()
            print(f"whole UNet call, median of {args.repeats}: F.linear everywhere {times['F.linear everywhere']:.2f} s,"
                  f" Linear as shipped {times['Linear as shipped']:.2f} s, ratio "
                  f"{times['Linear as shipped'] / times['F.linear everywhere']:.2f}; outputs differ by "
                  f"{difference:.1e} (relative)", flush=True)


if __name__ == "__main__":
    main()
