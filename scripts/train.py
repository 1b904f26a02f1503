"""Train an autoencoder or a latent diffusion model from a config (the role of the original main.py).

    python scripts/train.py --base configs/autoencoder/shapes-kl-f4.yaml --max_minutes 20
    python scripts/train.py --base configs/latent-diffusion/shapes-ldm.yaml --first_stage_ckpt AE.ckpt \
        --export models/ldm/shapes-ldm/model.ckpt
    python scripts/train.py --resume logs/<run>            # continues from logs/<run>/checkpoints/last.ckpt
    python scripts/train.py --base configs/latent-diffusion/shapes-ldm.yaml --base_ckpt MODEL.ckpt \
        --lora_rank 4 --export models/Lora/NAME.safetensors   # a LoRA (kohya-ss format) on a trained model
    python scripts/train.py --base configs/latent-diffusion/shapes-ldm.yaml --base_ckpt MODEL.ckpt \
        --embedding NAME --init_word WORD --export embeddings/NAME.pt   # a textual-inversion embedding
    python scripts/train.py --base CONFIG --accelerator gpu --devices 4 --strategy ddp   # 4 processes, 1 machine
    torchrun --nnodes 2 --node_rank N --master_addr HOST --master_port 29500 --nproc_per_node 4 scripts/train.py \
        --base CONFIG --accelerator gpu --devices 4 --num_nodes 2 --strategy ddp       # on each of 2 machines

Logs (metrics.csv, configs/, checkpoints/, images/) go to <logdir>/<time>_<config name>/. Bad input (a config
that cannot be read or names a class outside ldm without --trust_config, a bad --set or --resume) is one line
on stderr, exit status 2, and creates nothing.
The logic lives in ldm.training; this file only reads the command line.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate.options import OneLineParser, run_cli  # noqa: E402


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", nargs="*", default=[], metavar="CONFIG",
                        help="config files, merged left to right (later ones override earlier ones)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set model.base_learning_rate=2e-4 data.params.train.params.size=64")
    parser.add_argument("--resume", help="a log dir or a checkpoint in one: continue that run (configs included)")
    parser.add_argument("--logdir", default="logs")
    parser.add_argument("--name", help="run name (default: the last config's file name)")
    parser.add_argument("--max_steps", type=int, default=-1, help="total optimizer steps (-1: no limit)")
    parser.add_argument("--max_minutes", type=float, help="stop after this much training time")
    parser.add_argument("--batch_size", type=int, help="per-device batch size (default: the config's)")
    parser.add_argument("--num_workers", type=int, help="data loader workers (default: the config's)")
    parser.add_argument("--scale_lr", action="store_true",
                        help="learning rate = base_learning_rate x global batch size (the originals' default); "
                             "without it the config's base_learning_rate is used as is")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"],
                        help="32 (default: measured faster than bf16 autocast for our small models on CPU)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto",
                        help="number of devices (processes with ddp) per machine, or a list like 0,1; under torchrun "
                             "its --nproc_per_node")
    parser.add_argument("--num_nodes", type=int, default=1, help="machines (under torchrun its --nnodes)")
    parser.add_argument("--strategy", default="auto",
                        help="e.g. ddp: one process per device, gradients averaged, each rank its own share of the "
                             "data, rank 0 writes the log dir (any Lightning strategy name)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's choice); on a CPU shared with other jobs "
                             "1 thread was measured 4-5x faster than 2 (no spinning threads waiting on each other)")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--first_stage_ckpt",
                        help="trained autoencoder weights for a latent-diffusion config (or training.first_stage_ckpt)")
    parser.add_argument("--export", metavar="PATH",
                        help="write the final (EMA) weights as a small fp16 checkpoint, its config as PATH.yaml beside "
                             "(a LoRA: a .safetensors; an embedding: NAME.pt or NAME.safetensors)")
    parser.add_argument("--trust_config", action="store_true",
                        help="let the configs build any class or call they name (your own research code); by "
                             "default only this project's classes (ldm.*) and a short allow-list are built")
    adapters = parser.add_argument_group("LoRA and textual inversion (ldm.lora_training): the model is frozen")
    adapters.add_argument("--base_ckpt", help="the trained model (its .yaml beside it) that the LoRA or embedding is for")
    adapters.add_argument("--lora_rank", type=int, help="train a LoRA of this rank (written as kohya-ss .safetensors)")
    adapters.add_argument("--lora_alpha", type=float, help="the LoRA's alpha (its change is scaled by alpha / rank; "
                                                             "default: the rank)")
    adapters.add_argument("--lora_targets", default="both", choices=["unet", "text", "both"],
                          help="the layers trained: the UNet's attention blocks, the text encoder's, or both")
    adapters.add_argument("--lora_convolutions", action="store_true",
                          help="also train the UNet's ResBlock and sampler convolutions (LoCon)")
    adapters.add_argument("--embedding", metavar="NAME", help="train a textual-inversion embedding used by this name")
    adapters.add_argument("--embedding_vectors", type=int, default=1, help="the embedding's token vectors")
    adapters.add_argument("--init_word", default="*", help="the embedding starts from this word's token vectors")
    options = parser.parse_args(argv)
    if options.devices.isdigit():
        options.devices = int(options.devices)
    return options


def main(argv=None):
    """Train; returns (log dir, Lightning trainer). Bad input raises UserError before anything is created."""
    from ldm.training import train

    return train(parse_args(argv))


def command_line():
    main()
    return 0


if __name__ == "__main__":
    run_cli(command_line)
