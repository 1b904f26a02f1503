"""Attention on a CPU: PyTorch's fused kernel in fp32 and bf16 beside our bf16 attention by rows, per layer shape.

    python benchmarks/attention.py [--repeats 5]

`ldm.modules.attention.attention` runs bf16 attention over many keys as two oneDNN bf16 matmuls around a
softmax, head by head, a block of query rows at a time, on a CPU with bf16 arithmetic (AVX512_BF16 or AMX);
everything else stays in `scaled_dot_product_attention`. For the attention layers of SD 1.x and 2.x UNets
(batch 2 = one guided step, batch 1 = CFG 1) and the VAE decoder's one-head attention, this prints each way's
time per layer (alternating, median of --repeats), the ratios, which way `attention` takes, and each bf16 way's
relative difference from fp32's fused kernel (inputs made in fp32 and rounded to bf16, as an int8 UNet's
attention gets them). On a CPU without bf16 arithmetic the by-rows column measures oneDNN's emulated bf16, which
`attention` never takes.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.cpu import cpu_bf16_support  # noqa: E402
from ldm.modules import attention  # noqa: E402
from sampling_speed import relative_error  # noqa: E402

# (what, batch, query tokens, key tokens, heads, head size)
SHAPES = [
    ("SD 1.x 512², top level", 2, 4096, 4096, 8, 40),
    ("SD 1.x 512², top level, CFG 1", 1, 4096, 4096, 8, 40),
    ("SD 1.x 512², second level", 2, 1024, 1024, 8, 80),
    ("SD 1.x 512², third level", 2, 256, 256, 8, 160),
    ("SD 1.x 512², cross-attention", 2, 4096, 77, 8, 40),
    ("SD 1.x 768², top level, CFG 1", 1, 9216, 9216, 8, 40),
    ("SD 2.x 768², top level, CFG 1", 1, 9216, 9216, 5, 64),
    ("SD 1.x 1024², top level, CFG 1", 1, 16384, 16384, 8, 40),
    ("VAE decoder 512², middle", 1, 4096, 4096, 1, 512),
    ("VAE decoder 1024², middle", 1, 16384, 16384, 1, 512),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(common.use_our_process_settings())
    print(f"CPU bf16 arithmetic: {cpu_bf16_support()} (native, emulated or none)\n")
    print("| layer | batch × heads × queries × keys × head size | fused fp32 | fused bf16 | bf16 by rows | "
          "by rows ÷ fused fp32 | by rows ÷ fused bf16 | `attention` takes | rel. diff. fused bf16 / by rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for what, batch, queries, keys, heads, depth in SHAPES:
        q = torch.randn(batch, queries, heads, depth, generator=generator).transpose(1, 2)  # the layer's views
        k, v = (torch.randn(batch, keys, heads, depth, generator=generator).transpose(1, 2) for _ in range(2))
        q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
        with torch.inference_mode():
            ways = {"fused fp32": lambda: F.scaled_dot_product_attention(q, k, v),
                    "fused bf16": lambda: F.scaled_dot_product_attention(q16, k16, v16),
                    "by rows": lambda: attention._bf16_attention_by_rows(q16, k16, v16)}
            times = common.alternate(ways, args.repeats if keys < 9216 else max(1, args.repeats // 2))
            reference = ways["fused fp32"]()
            errors = [relative_error(ways[name]().float(), reference) for name in ("fused bf16", "by rows")]
            by_rows = attention.takes_bf16_by_rows(q16, k16)
        print(f"| {what} | {batch} × {heads} × {queries} × {keys} × {depth} | "
              f"{times['fused fp32'] * 1e3:.1f} ms | {times['fused bf16'] * 1e3:.1f} ms | "
              f"{times['by rows'] * 1e3:.1f} ms | {times['by rows'] / times['fused fp32']:.2f} | "
              f"{times['by rows'] / times['fused bf16']:.2f} | {'by rows' if by_rows else 'fused'} | "
              f"{errors[0]:.1e} / {errors[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
