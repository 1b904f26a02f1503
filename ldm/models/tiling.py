"""Decoding large latents in overlapping tiles, so that a big picture never needs the whole decoder at once.

The autoencoder's decoder holds activations of 128-512 channels at the full output size: an SD decode
of 2048x2048 needs tens of GB (its middle attention alone is quadratic in the latent size). Decoding
tiles of TILE_PIXELS and cross-fading them over their overlap bounds that at one tile's worth. The
result differs slightly from a whole decode (the decoder's group norms see one tile's statistics), so
it is used only above DECODE_TILED_ABOVE_PIXELS, where a whole decode is the memory risk.
"""
import math

import torch

DECODE_TILED_ABOVE_PIXELS = 1024 * 1024  # outputs larger than 1024x1024 are decoded in tiles
TILE_PIXELS = 512  # a tile's side in output pixels
OVERLAP_FRACTION = 0.25  # of a tile's side, cross-faded with each neighbour


def needs_tiling(latent_shape, factor: int, limit: int = DECODE_TILED_ABOVE_PIXELS) -> bool:
    height, width = latent_shape[-2:]
    return height * factor * width * factor > limit


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering `size`, neighbours sharing at least `overlap` cells."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    # Spread evenly, so that every overlap is about the same (none much larger than the others).
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _fade_weights(starts: list[int], tile: int, size: int, factor: int) -> list[torch.Tensor]:
    """Per tile, 1-D weights in output pixels: linear ramps across the overlaps with its neighbours.

    Across an overlap of L pixels the outgoing tile's ramp is (L - i - 0.5)/L and the incoming one's
    (i + 0.5)/L: every weight is positive, and the decode divides by their sum where tiles meet.
    """
    weights = []
    for index, start in enumerate(starts):
        length = min(tile, size - start) * factor
        weight = torch.ones(length, dtype=torch.float64)
        if index > 0:
            overlap = (starts[index - 1] + tile - start) * factor
            weight[:overlap] = (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap
        if index < len(starts) - 1:
            overlap = (start + tile - starts[index + 1]) * factor
            weight[length - overlap:] = torch.minimum(
                weight[length - overlap:], (overlap - torch.arange(overlap, dtype=torch.float64) - 0.5) / overlap)
        weights.append(weight)
    return weights


def decode_tiled(decode, z: torch.Tensor, factor: int, tile_pixels: int = TILE_PIXELS,
                 overlap_fraction: float = OVERLAP_FRACTION) -> torch.Tensor:
    """decode(z) for latents z [B, C, h, w] -> [B, 3, h·factor, w·factor] float32, tile by tile.

    `decode` maps a latent tile to its pixels (the model's decode_first_stage); tiles of tile_pixels
    (in output pixels) overlap by overlap_fraction of a tile and are cross-faded linearly.
    """
    tile = max(1, tile_pixels // factor)
    overlap = max(1, int(tile * overlap_fraction))
    height, width = z.shape[-2:]
    rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    row_weights = _fade_weights(rows, tile, height, factor)
    column_weights = _fade_weights(columns, tile, width, factor)
    output = torch.zeros(z.shape[0], 3, height * factor, width * factor, dtype=torch.float32)
    total_weight = torch.zeros(height * factor, width * factor, dtype=torch.float32)
    for top, row_weight in zip(rows, row_weights):
        for left, column_weight in zip(columns, column_weights):
            pixels = decode(z[..., top:top + tile, left:left + tile]).float().cpu()
            weight = (row_weight[:, None] * column_weight[None, :]).float()
            y, x = top * factor, left * factor
            output[..., y:y + pixels.shape[-2], x:x + pixels.shape[-1]] += pixels * weight
            total_weight[y:y + pixels.shape[-2], x:x + pixels.shape[-1]] += weight
    return output / total_weight
