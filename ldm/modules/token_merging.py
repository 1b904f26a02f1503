"""Token merging for Stable Diffusion (ToMe for SD, Bolya and Hoffman 2023; A1111's "Token merging ratio").

Before the self-attention of the highest-resolution transformer blocks, a share `ratio` of the picture's
tokens is merged into similar ones, and after it every token takes its merged token's output again, so the
attention runs over fewer tokens and everything around it is unchanged in shape.

The matching is tomesd's bipartite soft matching with 2-D strides: the picture is cut in 2x2 cells, one
token of each cell (picked at random) is a destination, the others are sources; each source's most similar
destination (cosine similarity of the block's input tokens) is its match, and the `r` best-matched sources
are averaged into their destinations. As tomesd with its defaults (and A1111), only the self-attention is
merged, never the cross-attention or the feed-forward. The random picks come from a generator the caller
seeds, so that a seed still means one picture.

"Highest resolution": the transformer blocks at the UNet's finest level that has any (SD 1.x and 2.x: the
full latent resolution, tomesd's `max_downsample=1`; SDXL and the embedded model: half of it, where their
first transformers are).
"""
import torch

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer

MAX_RATIO = 0.75  # 1 - 1 / (2 x 2): one token of each cell stays a destination


def _gather_rows(tensor, index):
    """tensor[b, index[b, i], :] for each row b: index [B or 1, n, 1]."""
    return tensor.gather(1, index.expand(tensor.shape[0], index.shape[1], tensor.shape[2]))


def destination_mask(height: int, width: int, generator: torch.Generator | None, stride: int = 2) -> torch.Tensor:
    """[height * width] booleans, True for the destination token of each full stride x stride cell (one at
    random from `generator`, the top-left one without); tokens of a partial last row or column are sources."""
    cells_y, cells_x = height // stride, width // stride
    if generator is None:
        pick = torch.zeros(cells_y, cells_x, dtype=torch.int64)
    else:
        pick = torch.randint(stride * stride, (cells_y, cells_x), generator=generator, device=generator.device).cpu()
    in_cell = torch.zeros(cells_y, cells_x, stride * stride, dtype=torch.bool)
    in_cell.scatter_(2, pick[..., None], True)
    cells = in_cell.view(cells_y, cells_x, stride, stride).transpose(1, 2).reshape(cells_y * stride, cells_x * stride)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[:cells_y * stride, :cells_x * stride] = cells
    return mask.flatten()


class Merge:
    """The merge and unmerge of one model call's tokens [B, N, C] for one block, as tomesd computes them.

    metric: the tokens whose cosine similarity decides the matches; r: how many tokens to merge away (at
    most the number of sources). merge(x) -> [B, N - r, C]; unmerge(y) -> [B, N, C], each token taking its
    destination's (or its own) row of y.
    """

    def __init__(self, metric: torch.Tensor, height: int, width: int, r: int, generator=None):
        batch, tokens, _ = metric.shape
        if tokens != height * width:
            raise ValueError(f"{tokens} tokens are not a {height}x{width} picture")
        is_destination = destination_mask(height, width, generator).to(metric.device)
        order = torch.cat([torch.nonzero(~is_destination).flatten(), torch.nonzero(is_destination).flatten()])
        sources = tokens - int(is_destination.sum())
        self.tokens, self.r = tokens, min(r, sources)
        self.source_index = order[:sources].view(1, -1, 1)  # token index of each source
        self.destination_index = order[sources:].view(1, -1, 1)
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True)
            source, destination = self.split(unit)
            best, match = (source @ destination.transpose(-1, -2)).max(dim=-1)
            ranked = best.argsort(dim=-1, descending=True)[..., None]  # [B, sources, 1], best matched first
        self.kept = ranked[:, self.r:]  # sources that stay themselves
        self.merged = ranked[:, :self.r]  # sources averaged into a destination
        self.match = match[..., None].gather(1, self.merged)  # each merged source's destination
        self.batch = batch

    def split(self, x):
        return _gather_rows(x, self.source_index), _gather_rows(x, self.destination_index)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        source, destination = self.split(x)
        kept, merged = _gather_rows(source, self.kept), _gather_rows(source, self.merged)
        channels = x.shape[-1]
        destination = destination.scatter_reduce(1, self.match.expand(-1, -1, channels), merged, reduce="mean")
        return torch.cat([kept, destination], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, channels = y.shape
        kept_count = self.kept.shape[1]
        kept, destination = y[:, :kept_count], y[:, kept_count:]
        out = y.new_zeros(batch, self.tokens, channels)
        token_of_source = self.source_index.expand(self.batch, -1, 1)
        out.scatter_(1, self.destination_index.expand(batch, -1, channels), destination)
        out.scatter_(1, token_of_source.gather(1, self.kept).expand(-1, -1, channels), kept)
        out.scatter_(1, token_of_source.gather(1, self.merged).expand(-1, -1, channels),
                     _gather_rows(destination, self.match))
        return out


def transformer_levels(unet) -> list[tuple[int, SpatialTransformer]]:
    """(downsampling level, transformer) of every SpatialTransformer of the UNet, in its order."""
    found, level = [], 0
    for block in unet.input_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.append((level, layer))
            elif type(layer).__name__ == "Downsample":
                level += 1
    found += [(level, layer) for layer in unet.middle_block if isinstance(layer, SpatialTransformer)]
    for block in unet.output_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.append((level, layer))
            elif type(layer).__name__ == "Upsample":
                level -= 1
    return found


def highest_resolution_transformers(unet) -> list[SpatialTransformer]:
    levels = transformer_levels(unet)
    finest = min((level for level, _ in levels), default=None)
    return [transformer for level, transformer in levels if level == finest]


class TokenMerging:
    """`with TokenMerging(unet, ratio, generator):` merges tokens in the self-attention of the UNet's highest-
    resolution transformer blocks, through forward hooks that are removed on exit (the weights are untouched).

    generator: where the destination picks come from (None: always each cell's top-left token). `merges`
    counts the merges made, for tests.
    """

    def __init__(self, unet, ratio: float, generator: torch.Generator | None = None):
        if not 0 < ratio <= MAX_RATIO:
            raise ValueError(f"a token merging ratio is in (0, {MAX_RATIO}], not {ratio}")
        self.transformers = highest_resolution_transformers(unet)
        if not self.transformers:
            raise ValueError("this UNet has no transformer blocks: token merging has nothing to merge")
        self.ratio, self.generator = ratio, generator
        self.handles, self.merges = [], 0
        self.size = None  # (height, width) of the transformer running now
        self.merge: Merge | None = None

    def __enter__(self):
        for transformer in self.transformers:
            self.handles.append(transformer.register_forward_pre_hook(self._picture_size))
            for block in transformer.transformer_blocks:
                self.handles.append(block.register_forward_pre_hook(self._match))
                self.handles.append(block.attn1.register_forward_pre_hook(self._merge))
                self.handles.append(block.attn1.register_forward_hook(self._unmerge))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.merge = None

    def _picture_size(self, module, args):
        self.size = tuple(args[0].shape[-2:])

    def _match(self, block: BasicTransformerBlock, args):
        tokens = args[0]
        height, width = self.size
        self.merge = Merge(tokens, height, width, int(tokens.shape[1] * self.ratio), self.generator)
        self.merges += 1

    def _merge(self, attention, args):
        return (self.merge.merge(args[0]), *args[1:])

    def _unmerge(self, attention, args, output):
        return self.merge.unmerge(output)

