"""One guided UNet call (batch 2, fp32), ours beside OpenVINO's, on one random full-size SD 1.x checkpoint.

    flock /tmp/bigmem.lock python benchmarks/step_vs_openvino.py --sizes 256 512 --repeats 3 [--profile] [--new-text-each-call]
    flock /tmp/bigmem.lock python benchmarks/step_vs_openvino.py --sizes 256 --int8

OpenVINO runs diffusers' UNet built from the same file (diffusers' own single-file conversion), converted with
`openvino.convert_model` and compiled for the CPU with its defaults (latency hint, threads = cores). Ours is the
UNet as `load_model` places it. Each side runs in its own process (two thread pools in one process steal
each other's cores), started once per size; the calls alternate between the two processes, one call at a
time, so a busy neighbour slows both alike. Medians of --repeats calls after
PACK_FROM_CALL warm-up calls each (ours has packed its deepest kernels by then).
--profile prints where each side's time goes: torch.profiler's operators for ours, OpenVINO's per-node
counters grouped by layer type for theirs. Every call of a side has the same text, as the steps of a run do, so
ours makes the text's keys and values for the cross-attention once; --new-text-each-call adds ours with a new
text on every call, as on a run's first step. --plain-upsampling adds ours with the upsampling convolutions done
the plain way; --int8 adds our `--precision int8` UNet and OpenVINO's full static int8 (NNCF, 8 calibration
batches, SmoothQuant; `pip install nncf`), each as a ratio to its own fp32 and to the other. --bf16 adds our
`--precision bf16` UNet and OpenVINO's bf16 inference precision (worth it only where the CPU has AVX512_BF16 or
AMX: the script says which it has). OpenVINO's fp32 side asks for f32 explicitly, as OpenVINO may otherwise pick
bf16 on such CPUs. Every side is a resident process with its own copy of the weights: with --int8 about 18 GB at
once.
"""
import argparse
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository on sys.path and sets HF_HUB_OFFLINE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.modules.diffusionmodules.util import PACK_FROM_CALL  # noqa: E402

SEED = 42
TIMESTEP = 801
CALIBRATION_BATCHES = 8
SIDES = ("ours", "openvino", "ours-plain-upsampling", "ours-new-text", "ours-int8", "openvino-int8", "ours-bf16", "openvino-bf16")


def step_inputs(size: int):
    generator = torch.Generator().manual_seed(SEED)
    latent = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    return latent, torch.full((2,), TIMESTEP), context


def our_call(args):
    from ldm.checkpoint import load_model
    from ldm.modules.diffusionmodules import util

    if args.child == "ours-plain-upsampling":  # what the four-phase upsampling convolutions buy
        util.PHASES_MIN_PIXELS = float("inf")
    dtype = torch.bfloat16 if args.child == "ours-bf16" else torch.float32
    unet = load_model(common.sd1_checkpoint(args.workdir), common.SD1_CONFIG, "cpu", dtype,
                      log=lambda line: None).model.model.diffusion_model
    if args.child == "ours-int8":  # what --precision int8 runs (inputs quantized on every call)
        from ldm.quantization import quantize_unet

        quantize_unet(unet)
    latent, timesteps, context = step_inputs(args.size)
    latent, context = latent.to(dtype), context.to(dtype)
    # ours-new-text: every call's text differs from the call's before, so the cross-attention makes the text's
    # keys and values anew each time, as the first step of a run does (the first call's is the shared text)
    texts = [context, torch.randn(context.shape, generator=torch.Generator().manual_seed(SEED + 1)).to(dtype)]
    calls = itertools.count()

    def call():
        text = texts[next(calls) % 2] if args.child == "ours-new-text" else context
        with torch.inference_mode():
            return unet(latent, timesteps, text).float()
    return call


def openvino_call(args):
    import openvino

    unet = common.diffusers_unet(common.read_original_checkpoint(common.sd1_checkpoint(args.workdir)))
    latent, timesteps, context = step_inputs(args.size)

    class Traced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    example = (latent, timesteps, context)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if args.child == "openvino-bf16" else "f32"}
    if args.profile:
        config["PERF_COUNT"] = "YES"
    with torch.inference_mode():
        model = openvino.convert_model(Traced(), example_input=example)
    del unet
    feed = [np.asarray(tensor) for tensor in example]
    if args.child == "openvino-int8":
        model = openvino_static_int8(model, args.size)
    compiled = openvino.compile_model(model, "CPU", config)
    del model  # the compiled model holds its own copy of the weights
    gc.collect()
    request = compiled.create_infer_request()

    def call():
        request.infer(feed)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    call.request = request
    return call


def openvino_static_int8(model, size: int):
    """NNCF's full static int8 (weights and activations; SmoothQuant, as its transformer preset applies it),
    calibrated on 8 batches of random latents and contexts at spread timesteps (speed does not depend on them;
    random weights cannot judge the quality anyway)."""
    import nncf

    batches = []
    for index in range(CALIBRATION_BATCHES):
        generator = torch.Generator().manual_seed(SEED + 1 + index)
        batches.append([torch.randn(2, 4, size // 8, size // 8, generator=generator).numpy(),
                        np.full((2,), 999 - 125 * index, dtype=np.int64),
                        torch.randn(2, 77, 768, generator=generator).numpy()])
    # Bias correction only moves the outputs (and takes minutes per UNet): off, as speed is what is measured.
    return nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=CALIBRATION_BATCHES,
                         advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True))


def our_profile(call) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        call()
    totals = [(event.key, event.self_cpu_time_total / 1e6) for event in recorded.key_averages()]
    return sorted(totals, key=lambda item: -item[1])


def openvino_profile(call) -> list[tuple[str, float]]:
    totals = defaultdict(float)
    for node in call.request.get_profiling_info():
        totals[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds()
    return sorted(totals.items(), key=lambda item: -item[1])


def child(args):
    """Serve calls on stdin ("call", "profile", "quit"), answering each with one JSON line on stdout."""
    if args.child.startswith("openvino"):
        # Not glibc's keep-freed-memory setting: OpenVINO manages its own buffers, and with it the torch UNet
        # converted from (and NNCF's calibration) would stay resident, 8 GB more per process at 512².
        from ldm.generate.loading import use_physical_cores

        use_physical_cores()
        call = openvino_call(args)
    else:
        common.use_our_process_settings()
        call = our_call(args)
    output = call()
    for _ in range(PACK_FROM_CALL - 1):  # ours packs its deepest kernels at this call with a shape
        call()
    np.save(args.workdir / f"step-vs-openvino-{args.child}-{args.size}.npy", output.numpy())
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "call":
            start = time.perf_counter()
            call()
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        elif command == "profile":
            rows = openvino_profile(call) if args.child.startswith("openvino") else our_profile(call)
            print(json.dumps({"profile": rows[:args.profile_rows]}), flush=True)
        else:
            return


def start_child(side: str, size: int, args) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", side, "--size", str(size), "--workdir", str(args.workdir),
               "--profile-rows", str(args.profile_rows)] + (["--profile"] if args.profile else [])
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ask(process, None)
    return process


def ask(process: subprocess.Popen, command: str | None) -> dict:
    if command:
        process.stdin.write(command + "\n")
        process.stdin.flush()
    while True:  # lines that are not the child's answer (NNCF's progress, a library's print) are passed over
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the child process ended (exit status {process.wait()})")
        if line.startswith("{"):
            return json.loads(line)


def relative(ours, theirs) -> float:
    return float(np.linalg.norm(ours.astype(np.float64) - theirs) / np.linalg.norm(theirs.astype(np.float64)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR, help="where the checkpoint is kept")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print where each side's time goes")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--plain-upsampling", action="store_true",
                        help="also ours with the upsampling convolutions the plain way (upsample, then 3x3)")
    parser.add_argument("--new-text-each-call", action="store_true",
                        help="also ours with the text changing every call (keys and values of the text made anew)")
    parser.add_argument("--int8", action="store_true",
                        help="also our --precision int8 UNet and OpenVINO's static int8 (NNCF, needs nncf)")
    parser.add_argument("--bf16", action="store_true",
                        help="also our --precision bf16 UNet and OpenVINO's bf16 inference precision")
    args = common.parse_with_children(parser, SIDES, child)
    if args is None:
        return
    from ldm.cpu import cpu_bf16_support

    print(f"CPU bf16 arithmetic: {cpu_bf16_support()} (native, emulated or none)", flush=True)
    common.sd1_checkpoint(args.workdir)
    rows = []
    for size in args.sizes:
        # OpenVINO's int8 starts first: its calibration is the largest peak, best met with nothing else resident.
        sides = (["openvino-int8", "ours-int8"] if args.int8 else []) + ["ours", "openvino"] + (
            ["ours-plain-upsampling"] if args.plain_upsampling else []) + (
            ["ours-new-text"] if args.new_text_each_call else []) + (
            ["ours-bf16", "openvino-bf16"] if args.bf16 else [])
        children = {side: start_child(side, size, args) for side in sides}
        times = {side: [] for side in children}
        for _ in range(args.repeats):
            for side, process in children.items():
                times[side].append(ask(process, "call")["seconds"])
        if args.profile:
            for side, process in children.items():
                print(f"\n{side} at {size}x{size}, one call, self time by operator:")
                for name, seconds in ask(process, "profile")["profile"]:
                    print(f"  {seconds:8.3f} s  {name}")
        for process in children.values():
            process.stdin.write("quit\n")
            process.stdin.close()
            process.wait()
        outputs = {side: np.load(args.workdir / f"step-vs-openvino-{side}-{size}.npy") for side in children}
        error = relative(outputs["ours"], outputs["openvino"])
        o, t = statistics.median(times["ours"]), statistics.median(times["openvino"])
        rows.append(f"| {size}² | {o:.2f} s | {t:.2f} s | {o / t:.2f} | {error:.1e} |")
        print(f"{size}²: ours {o:.2f} s, OpenVINO {t:.2f} s, ours ÷ OpenVINO {o / t:.2f}; every call: "
              + "; ".join(f"{side} " + " ".join(f"{s:.2f}" for s in values) for side, values in times.items()),
              flush=True)
        if args.plain_upsampling:
            plain = statistics.median(times["ours-plain-upsampling"])
            print(f"  ours with plain upsampling {plain:.2f} s: four-phase ÷ plain {o / plain:.2f}, outputs' relative "
                  f"difference {relative(outputs['ours'], outputs['ours-plain-upsampling']):.1e}", flush=True)
        if args.new_text_each_call:
            new_text = statistics.median(times["ours-new-text"])
            print(f"  ours with a new text every call {new_text:.2f} s: the same text ÷ a new one {o / new_text:.2f}, "
                  f"first calls' relative difference {relative(outputs['ours'], outputs['ours-new-text']):.1e}",
                  flush=True)
        if args.int8:
            ours_int8, theirs_int8 = (statistics.median(times[side]) for side in ("ours-int8", "openvino-int8"))
            print(f"  int8: ours {ours_int8:.2f} s ({ours_int8 / o:.2f}x our fp32), OpenVINO {theirs_int8:.2f} s "
                  f"({theirs_int8 / t:.2f}x its fp32); ours ÷ OpenVINO in int8 {ours_int8 / theirs_int8:.2f}; "
                  f"relative difference from fp32 (random weights: not a quality measure) ours "
                  f"{relative(outputs['ours-int8'], outputs['ours']):.1e}, OpenVINO "
                  f"{relative(outputs['openvino-int8'], outputs['openvino']):.1e}", flush=True)
        if args.bf16:
            ours_bf16, theirs_bf16 = (statistics.median(times[side]) for side in ("ours-bf16", "openvino-bf16"))
            print(f"  bf16: ours {ours_bf16:.2f} s ({ours_bf16 / o:.2f}x our fp32), OpenVINO {theirs_bf16:.2f} s "
                  f"({theirs_bf16 / t:.2f}x its fp32); ours ÷ OpenVINO in bf16 {ours_bf16 / theirs_bf16:.2f}; "
                  f"relative difference from fp32 ours {relative(outputs['ours-bf16'], outputs['ours']):.1e}, "
                  f"OpenVINO {relative(outputs['openvino-bf16'], outputs['openvino']):.1e}", flush=True)
    print("\n| size | ours | OpenVINO | ours ÷ OpenVINO | outputs' relative difference |")
    print("|------|------|----------|-----------------|------------------------------|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
