"""Tiled decoding of a large picture (ldm.models.tiling) shows no seams where tiles meet.

A tile's decode differs from the whole decode in two ways that make seams: the decoder's group norms see
only the tile's statistics, and its convolutions zero-pad the tile's edges. The stand-in decoder here has
both (a GroupNorm, a zero-padded 3x3 convolution) and is otherwise smooth (an averaging kernel, bilinear
upsampling), so that on a smooth latent any seam stands out: at the tile size and overlap run.py uses for
large pictures, the largest jump between neighbouring pixels across a tile's edge must be no larger than
inside the tiles. The same measure on tiles pasted side by side without the cross-fade finds their seams.
"""
import math

import torch
from torch import nn

from ldm.models.tiling import OVERLAP_FRACTION, TILE_PIXELS, decode_tiled, tile_starts

FACTOR = 8
LATENT_SIDE = 160  # 1280x1280 pixels: 3 x 3 tiles of TILE_PIXELS
BORDER_CELLS = 2  # latent cells next to the picture's own border, where the padding makes its own jumps
SEAM_TOLERANCE = 1.25  # the largest jump across an edge at most this times the largest elsewhere


def tile_sensitive_decoder() -> nn.Module:
    conv = nn.Conv2d(4, 3, 3, padding=1)
    nn.init.constant_(conv.weight, 1 / 36)
    nn.init.constant_(conv.bias, 0.5)
    return nn.Sequential(nn.GroupNorm(1, 4), conv, nn.Upsample(scale_factor=FACTOR, mode="bilinear")).eval()


def smooth_latent(side: int) -> torch.Tensor:
    """Slow waves with an offset that varies across the picture, so that tiles' statistics differ."""
    position = torch.arange(side, dtype=torch.float32) / side
    y, x = position[:, None], position[None, :]
    waves = [torch.sin(2 * math.pi * (0.7 * x + 0.4 * y) + channel) + 2 * x * y + channel * y for channel in range(4)]
    return torch.stack(waves)[None]


def tile_edges(side: int) -> list[int]:
    """Output columns c where a tile begins at c + 1 or ends at c (the pair c, c + 1 straddles the edge)."""
    tile = TILE_PIXELS // FACTOR
    starts = tile_starts(side, tile, max(1, int(tile * OVERLAP_FRACTION)))
    return sorted({start * FACTOR - 1 for start in starts[1:]} | {(start + tile) * FACTOR - 1 for start in starts[:-1]})


def seam_ratio(pixels: torch.Tensor, edges: list[int]) -> float:
    """The largest jump between neighbours straddling a tile edge, over the largest elsewhere in the picture
    (rows and columns alike; the picture's own border left out)."""
    columns = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(dim=(0, 1, 2))
    rows = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(dim=(0, 1, 3))
    ratios = []
    for jumps in (columns, rows):
        inside = range(BORDER_CELLS * FACTOR, jumps.shape[0] - BORDER_CELLS * FACTOR)
        elsewhere = [index for index in inside if index not in edges]
        ratios.append((jumps[edges].max() / jumps[elsewhere].max()).item())
    return max(ratios)


def pasted_without_fading(decode, z: torch.Tensor) -> torch.Tensor:
    """Tiles of TILE_PIXELS decoded apart and pasted edge to edge, as a tiling without overlap would."""
    tile = TILE_PIXELS // FACTOR
    rows = [torch.cat([decode(z[..., top:top + tile, left:left + tile]) for left in range(0, z.shape[-1], tile)], -1)
            for top in range(0, z.shape[-2], tile)]
    return torch.cat(rows, -2)


@torch.inference_mode()
def test_a_tiled_decode_of_a_large_smooth_latent_has_no_seams():
    decode, z = tile_sensitive_decoder(), smooth_latent(LATENT_SIDE)
    tiled = decode_tiled(decode, z, FACTOR)
    assert tiled.shape == (1, 3, LATENT_SIDE * FACTOR, LATENT_SIDE * FACTOR)
    edges = tile_edges(LATENT_SIDE)
    assert len(edges) == 4  # 3 x 3 tiles: two overlaps each way, each with two edges
    assert seam_ratio(tiled, edges) <= SEAM_TOLERANCE
    # The tiles do differ (else there would be nothing to hide) ...
    assert (tiled - decode(z)).abs().max() > 0.05
    # ... and the measure sees a seam where tiles are pasted without the cross-fade.
    hard_edges = [start * FACTOR - 1 for start in range(TILE_PIXELS // FACTOR, LATENT_SIDE, TILE_PIXELS // FACTOR)]
    assert seam_ratio(pasted_without_fading(decode, z), hard_edges) > 2 * SEAM_TOLERANCE
