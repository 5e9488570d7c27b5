"""Wen et al.'s memorization detection on the shipped tiny base, after full fine-tuning on a duplicated D_mem.

Protocol (MemControl's HPO set at CPU scale, on the built-in ``digits`` domain):

1. D_mem = ``--dmem_size`` training pairs whose captions get a distinct nonsense word each
   (``build_memorization_set(unique_captions=True)``), duplicated ``--dmem_repeats`` times and added to a
   ``--proxy_fraction`` subset of the training split (``build_hpo_set``).
2. Full fine-tuning of the tiny base's UNet (``training.train``, method ``full``) on cached latents and text
   embeddings (``encode_images`` / ``encode_prompts``; each image is encoded once, so duplicates are exact).
3. ``wen_detection_scores`` (cheap settings: ``--steps`` DDIM steps, ``--generations`` per prompt) for the D_mem
   prompts (positives) and for as many unseen prompts built the same way (a test-split caption + a fresh
   nonsense word; negatives), before and after fine-tuning; ``detection_auc`` scores the separation.
   The headline ``auc`` is Wen et al.'s first-step variant; the trajectory mean and per-step AUCs are reported
   too (at this scale only the first steps separate, see ``note`` in the JSON).

Runs single-threaded by default (``--num_threads 1``): on shared cores, OpenMP spin-waiting of a 2-thread torch
made the same run 5-10x slower.

Writes ``benchmarks/results/wen_detection.json``. Usage::

    python benchmarks/wen_detection.py    # defaults: 20 pairs x 50 + 10% proxy, 1500 steps, batch 32, lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_memcontrol.data.datasets import (
    build_hpo_set,
    build_memorization_set,
    nonsense_words,
)
from diffusers_memcontrol.data.encoding import encode_images, encode_prompts
from diffusers_memcontrol.data.images import pixel_batch
from diffusers_memcontrol.data.tiny_base import IMAGE_SIZE, load_domain, tiny_base_path
from diffusers_memcontrol.files import write_json_atomic
from diffusers_memcontrol.metrics.memorization import detection_auc, dmem_search, wen_detection_scores
from diffusers_memcontrol.trainer.batches import training_data_from_tensors
from diffusers_memcontrol.trainer.config import FineTuneConfig
from diffusers_memcontrol.trainer.loop import train

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "wen_detection.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (defaults keep the run within a few minutes on 2 CPU cores)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dmem_size", type=int, default=20)
    p.add_argument("--dmem_repeats", type=int, default=50)
    p.add_argument("--proxy_fraction", type=float, default=0.1)
    p.add_argument("--max_train_steps", type=int, default=1500)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10, help="Sampling steps of the detection trajectory.")
    p.add_argument("--generations", type=int, default=4, help="Generations per prompt (Wen et al.: 4).")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Wen et al.'s default.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1,
                   help="torch threads (1 avoids OpenMP spin-waiting when the cores are shared).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=RESULTS)
    return p.parse_args(argv)


def detection(pipe, positives: list[str], negatives: list[str], args: argparse.Namespace) -> dict:
    """Wen scores of both prompt sets and their AUCs: trajectory mean, first step only, and per step.

    One sampling run per prompt set: the first-step variant is the first column of the per-step norms (the same
    initial noise, as ``wen_detection_scores(first_step_only=True)`` would draw).
    """
    per_step = {}
    for label, prompts in (("dmem", positives), ("unseen", negatives)):
        # the same initial noises for both sets (common random numbers): scores differ only through the prompts
        generator = torch.Generator("cpu").manual_seed(args.seed)
        per_step[label] = wen_detection_scores(
            pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            num_images_per_prompt=args.generations, generator=generator, batch_size=64, show_progress=False,
            return_per_step=True)  # [prompts, generations, steps]
    out = {}
    for name, reduce in (("trajectory", lambda x: x.mean(dim=(1, 2))), ("first_step", lambda x: x[..., 0].mean(1))):
        pos, neg = reduce(per_step["dmem"]), reduce(per_step["unseen"])
        out[name] = detection_auc(pos, neg)
        out[name].update({"mean_score_dmem": float(pos.mean()), "mean_score_unseen": float(neg.mean())})
    steps = per_step["dmem"].shape[-1]
    out["auc_per_step"] = [round(detection_auc(per_step["dmem"][..., i].mean(1),
                                               per_step["unseen"][..., i].mean(1))["auc"], 3) for i in range(steps)]
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the protocol and write the JSON report; returns it."""
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    if not os.path.isfile(os.path.join(tiny_base_path(), "model_index.json")):
        raise SystemExit(f"The tiny base is not built yet: {tiny_base_path()}/model_index.json is missing.")
    started = time.perf_counter()
    timings = {}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_path(), safety_checker=None).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # Wen et al. sample with DDIM
    pipe.set_progress_bar_config(disable=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    train_split = load_domain("digits", "train")
    test = load_domain("digits", "test")
    dmem = build_memorization_set(train_split, dmem_size=args.dmem_size, unique_captions=True, seed=args.seed)
    hpo = build_hpo_set(train_split, dmem, dmem_repeats=args.dmem_repeats, proxy_fraction=args.proxy_fraction,
                        seed=args.seed)
    positives = list(dmem["text"])
    vocabulary = sorted({w for c in train_split["text"] for w in c.split()} | {c.split()[-1] for c in positives})
    words = nonsense_words(args.dmem_size, seed=args.seed + 1, avoid=vocabulary)
    rng = np.random.default_rng(args.seed)
    unseen_rows = rng.choice(len(test), size=args.dmem_size, replace=False)
    negatives = [f"{test[int(r)]['text']} {w}" for r, w in zip(unseen_rows, words)]
    assert not set(positives) & set(negatives)

    # cache latents/embeddings once per unique row: the D_mem duplicates are exact copies
    t0 = time.perf_counter()
    proxy_rows = sorted({int(i) for i, d in zip(range(len(hpo)), hpo["dmem_index"]) if d < 0})
    proxy = hpo.select(proxy_rows)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with torch.no_grad():
        dmem_latents = encode_images(pipe.vae, pixel_batch(dmem["image"], IMAGE_SIZE), generator=generator)
        proxy_latents = encode_images(pipe.vae, pixel_batch(proxy["image"], IMAGE_SIZE), generator=generator)
        dmem_embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, positives)
        proxy_embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(proxy["text"]))
        uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    latents = torch.cat([proxy_latents, dmem_latents.repeat(args.dmem_repeats, 1, 1, 1)])
    embeds = torch.cat([proxy_embeds, dmem_embeds.repeat(args.dmem_repeats, 1, 1)])
    timings["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    before = detection(pipe, positives, negatives, args)
    dmem_before = dmem_search(pipe.unet, noise_scheduler, dmem_latents, dmem_embeds, uncond,
                              generator=torch.Generator("cpu").manual_seed(args.seed))
    timings["detect_before"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    config = FineTuneConfig(peft_method="full", learning_rate=args.learning_rate,
                            max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
                            caption_dropout=0.1, seed=args.seed)
    data = training_data_from_tensors(latents.to(args.device), embeds, uncond[0])
    log = train(pipe.unet, noise_scheduler, data, config, progress=sys.stderr.isatty())
    timings["fine_tune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    after = detection(pipe, positives, negatives, args)
    dmem_after = dmem_search(pipe.unet, noise_scheduler, dmem_latents, dmem_embeds, uncond,
                             generator=torch.Generator("cpu").manual_seed(args.seed))
    timings["detect_after"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    report = {
        "benchmark": "wen_detection",
        "description": "Wen et al. detection AUC of duplicated D_mem prompts vs unseen prompts on the tiny base, "
                       "before and after full fine-tuning on the HPO set (proxy + D_mem x repeats).",
        "command": "python benchmarks/wen_detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "hpo_set_rows": len(hpo),
        "proxy_rows": len(proxy_rows),
        "trainable_params": log["trainable_params"],
        "final_loss": log["final_loss"],
        "auc": after["first_step"]["auc"],
        "auc_trajectory": after["trajectory"]["auc"],
        "note": "auc = Wen et al.'s first-step variant (norm at the first sampling step, averaged over generations). "
                "At this scale the mean over the whole guided trajectory does not separate: once a memorized "
                "prompt's trajectory has reached its training image, the unconditional prediction (trained on a "
                "set that is mostly D_mem) agrees with the conditional one, so later steps score memorized prompts "
                "lower than unseen ones (see auc_per_step).",
        "after_fine_tuning": after,
        "before_fine_tuning": before,
        "dmem_search": {"before": {"max": dmem_before.max, "mean": dmem_before.mean},
                        "after": {"max": dmem_after.max, "mean": dmem_after.mean}},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    write_json_atomic(args.output, report)
    print(json.dumps({"auc_first_step": report["auc"], "auc_trajectory": report["auc_trajectory"],
                      "auc_first_step_before_fine_tuning": before["first_step"]["auc"],
                      "auc_per_step": after["auc_per_step"], "timings_s": report["timings_s"]}, indent=2))
    return report


if __name__ == "__main__":
    main()
