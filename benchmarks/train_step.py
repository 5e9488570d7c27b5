"""Training-step throughput with the latent/text-embedding cache vs encoding every step, on the tiny base.

Both modes run the same loop (`diffusers_memcontrol.trainer.loop.train`) on the same data, seeds and adapter; the only
difference is where latents and caption embeddings come from: the content-addressed cache (`cache="disk"`, filled
once, timed separately as `prepare_cold_s` / `prepare_warm_s`) or the VAE and text encoder at every step
(`cache="off"`, what diffusers' train_text_to_image.py does). Modes are interleaved and repeated, and the median
loop time is kept, so both see the same machine load.

    python benchmarks/train_step.py                      # writes benchmarks/results/train_step.json
    python benchmarks/train_step.py --batch_sizes 8 32 --methods svdiff lora --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import torch
from sd15 import SD15_TEXT, SD15_UNET, SD15_VAE


def _sd15_pipeline():
    """Stable Diffusion 1.5's architecture with random weights (nothing is downloaded): for timings only."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_memcontrol.data import tiny_base as tb

    torch.manual_seed(0)
    return StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(
        **SD15_TEXT)), tokenizer=tb.build_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=tb.build_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False), \
        "Stable Diffusion 1.5 architecture, random weights"


def _pipeline(model: str = "tiny"):
    from diffusers import StableDiffusionPipeline

    from diffusers_memcontrol.data import tiny_base as tb

    if model == "sd15":
        return _sd15_pipeline()
    path = tb.tiny_base_path()
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False), \
            "shipped tiny base"
    pipe = StableDiffusionPipeline(vae=tb.build_vae(), text_encoder=tb.build_text_encoder(),
                                   tokenizer=tb.build_tokenizer(), unet=tb.build_unet(), scheduler=tb.build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, "tiny base architecture, random weights (shipped assets missing)"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write the JSON and print a markdown table; return the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15"],
                        help="tiny: the shipped tiny base; sd15: SD1.5's architecture with random weights (GPU).")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--resolution", type=int, default=None, help="Default: the model's (32 tiny, 512 sd15).")
    parser.add_argument("--samples", type=int, default=256, help="Digits training images used.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--methods", nargs="+", default=["svdiff", "lora"])
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per timed run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per mode (median kept).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the fastest on a small shared CPU; 0 = torch's default).")
    parser.add_argument("--output", default=None, help="Default: benchmarks/results/train_step[_sd15].json.")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "train_step.json" if args.model == "tiny" else f"train_step_{args.model}.json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_memcontrol.data.tiny_base import load_domain
    from diffusers_memcontrol.trainer.batches import prepare_training_data
    from diffusers_memcontrol.trainer.config import FineTuneConfig
    from diffusers_memcontrol.trainer.loop import train

    pipe, model = _pipeline(args.model)
    pipe.to(device)
    dataset = load_domain("digits", "train").select(range(args.samples))
    with tempfile.TemporaryDirectory() as cache_dir:
        clock = time.perf_counter()
        cached = prepare_training_data(pipe, dataset, cache="disk", cache_dir=cache_dir, resolution=args.resolution,
                                       center_crop=True, progress=False)
        prepare_cold = time.perf_counter() - clock
        clock = time.perf_counter()
        cached = prepare_training_data(pipe, dataset, cache="disk", cache_dir=cache_dir, resolution=args.resolution,
                                       center_crop=True, progress=False)
        prepare_warm = time.perf_counter() - clock
        assert cached.stats["latent_cache"]["misses"] == 0
    clock = time.perf_counter()
    on_the_fly = prepare_training_data(pipe, dataset, cache="off", resolution=args.resolution, center_crop=True,
                                       progress=False)
    prepare_off = time.perf_counter() - clock

    rows = []
    for method in args.methods:
        for batch in args.batch_sizes:
            config = FineTuneConfig(peft_method=method, max_train_steps=args.steps, train_batch_size=batch, seed=0)
            times: dict[str, list[float]] = {"cache": [], "off": []}
            for _ in range(args.repeats):
                for mode, data in (("cache", cached), ("off", on_the_fly)):
                    log = train(copy.deepcopy(pipe.unet), pipe.scheduler, data, config, progress=False)
                    times[mode].append(log["train_time_s"])
            cache_s, off_s = statistics.median(times["cache"]), statistics.median(times["off"])
            rows.append({"method": method, "batch_size": batch, "steps": args.steps,
                         "cached_steps_per_s": round(args.steps / cache_s, 2),
                         "on_the_fly_steps_per_s": round(args.steps / off_s, 2),
                         "cached_s_per_step": round(cache_s / args.steps, 4),
                         "on_the_fly_s_per_step": round(off_s / args.steps, 4),
                         "speedup": round(off_s / cache_s, 2),
                         "runs_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()}})
            print(f"{method} batch {batch}: cache {rows[-1]['cached_steps_per_s']} steps/s, "
                  f"on the fly {rows[-1]['on_the_fly_steps_per_s']} steps/s, x{rows[-1]['speedup']}", flush=True)

    result = {
        "benchmark": "train_step",
        "model": model,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "resolution": cached.resolution,
        "train_samples": args.samples,
        "prepare_cold_s": round(prepare_cold, 3),
        "prepare_warm_s": round(prepare_warm, 3),
        "prepare_on_the_fly_s": round(prepare_off, 3),
        "results": rows,
        "min_speedup": min(r["speedup"] for r in rows),
        "note": "Loop time only (train_time_s of training.train: injection and SVD excluded); median of the "
                "interleaved repeats. The cache is filled once per dataset and reused across runs and trials.",
    }
    from diffusers_memcontrol.files import write_json_atomic

    write_json_atomic(args.output, result)

    print()
    print("| method | batch | cached steps/s | on-the-fly steps/s | speedup |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['batch_size']} | {r['cached_steps_per_s']} | {r['on_the_fly_steps_per_s']} | "
              f"x{r['speedup']} |")
    print(f"\ncache fill: {result['prepare_cold_s']} s cold, {result['prepare_warm_s']} s warm "
          f"({args.samples} images, {model}, {result['torch_threads']} thread(s)); written to {args.output}")
    return result


if __name__ == "__main__":
    main()
