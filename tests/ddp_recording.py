"""Config targets for tests/test_ddp_training.py, built (with --trust_config) inside the training processes: the
tiny model and the shapes data, with each rank writing down what it trained on and what its weights were.

Each rank appends JSON lines to <record_dir>/rank-<global rank>.jsonl, per step: "start" (the batch's sample
indices, a digest of the weights and of torch's generator state), "loss" (this rank's own loss), "end" (a digest
of the weights after the optimizer step and the EMA update).
"""
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ldm.data.shapes import ShapesDataset
from ldm.models.diffusion.ddpm import LatentDiffusion


def weights_digest(state_dict: dict) -> str:
    """sha256 of every tensor by name, whatever its memory layout (training keeps convolutions channels-last)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_records(record_dir) -> dict:
    """{rank: [entry, ...]} of every rank that wrote."""
    return {int(path.stem.split("-")[1]): [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted(Path(record_dir).glob("rank-*.jsonl"))}


class IndexedShapes(ShapesDataset):
    """Shapes whose items carry their index."""

    def __getitem__(self, index):
        return {**super().__getitem__(index), "index": index}


class RecordingLatentDiffusion(LatentDiffusion):
    def __init__(self, record_dir, **kwargs):
        super().__init__(**kwargs)
        self.record_dir = Path(record_dir)

    def record(self, **entry):
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(self.record_dir / f"rank-{rank}.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def training_loss(self, batch):
        generator = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        self.record(event="start", indices=batch["index"].tolist(), weights=weights_digest(self.state_dict()),
                    generator=generator)
        loss, logs = super().training_loss(batch)
        self.record(event="loss", loss=loss.item())
        return loss, logs

    def update_ema(self):
        super().update_ema()
        self.record(event="end", weights=weights_digest(self.state_dict()))
