"""Fine-tune a Stable Diffusion UNet with a MemControl adapter (a PEFT method restricted by a mask).

Extends diffusers' examples/text_to_image/train_text_to_image.py: the model, data and optimisation arguments keep
their names and meanings; MemControl adds --peft_method, --mask, --mask_layout and --mask_scope.

    accelerate launch training/train_memcontrol.py                          # embedded default: tiny base + digits
    accelerate launch training/train_memcontrol.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir /data/mimic_cxr --caption_column report --resolution 512 \
        --peft_method svdiff --mask_layout paper --mask 1011010110111 --output_dir out/svdiff
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (diffusers' names where they exist)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Hub id or folder of a diffusers Stable Diffusion pipeline (default: the shipped tiny base).")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="A built-in domain (digits, fashion-mnist, animal-mnist) or a datasets Hub id "
                        "(default: digits).")
    g.add_argument("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl/csv.")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=None, help="Default: the UNet's sample size x VAE factor.")
    g.add_argument("--center_crop", action="store_true")
    g = p.add_argument_group("memcontrol")
    g.add_argument("--peft_method", default="svdiff",
                   choices=["svdiff", "difffit", "attention", "lora", "full", "freeze"])
    g.add_argument("--mask", default=None, help="Bit string, mask JSON file, or folder holding mask.json.")
    g.add_argument("--mask_layout", default="blocks", choices=["blocks", "attention", "paper"])
    g.add_argument("--mask_scope", default="reference", choices=["reference", "strict"])
    g.add_argument("--lora_rank", type=int, default=4)
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="memcontrol-output")
    g.add_argument("--train_batch_size", type=int, default=32)
    g.add_argument("--max_train_steps", type=int, default=400)
    g.add_argument("--learning_rate", type=float, default=None,
                   help="Default: 1e-3 for svdiff/difffit, 1e-4 for lora, 1e-5 for attention/full.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--caption_dropout", type=float, default=0.1)
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--report_to", default="tensorboard")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    return p.parse_args(argv)


DEFAULT_LR = {"svdiff": 1e-3, "difffit": 1e-3, "lora": 1e-4, "attention": 1e-5, "full": 1e-5, "freeze": 1e-3}


def main(argv: list[str] | None = None) -> dict:
    """Load model and data, fine-tune, save the adapter and a validation grid; return the run summary."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import StableDiffusionPipeline

    from diffusers_memcontrol.data import load_image_caption_dataset, preprocess_images
    from diffusers_memcontrol.tiny_base import tiny_base_path
    from diffusers_memcontrol.training import (
        FineTuneConfig,
        encode_images,
        encode_prompts,
        fine_tune,
        resolve_mask,
        save_adapter,
    )

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir,
                                                                                                 "logs")),
    )
    set_seed(args.seed)
    started = time.time()

    model_path = args.pretrained_model_name_or_path or tiny_base_path()
    pipe = StableDiffusionPipeline.from_pretrained(model_path, revision=args.revision, variant=args.variant,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.to(accelerator.device)
    unet, vae = pipe.unet, pipe.vae
    vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet.requires_grad_(False)

    mask = resolve_mask(args.mask, unet, args.peft_method, args.mask_layout)
    resolution = args.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    dataset = load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.image_column,
                                         args.caption_column, split="train", max_samples=args.max_train_samples)
    images = preprocess_images(dataset[args.image_column], resolution, center_crop=args.center_crop)
    captions = list(dataset[args.caption_column])
    latents = encode_images(vae, images, generator=torch.Generator().manual_seed(args.seed))
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])[0]

    config = FineTuneConfig(
        peft_method=args.peft_method, mask=mask.to_dict() if mask else None, mask_layout=args.mask_layout,
        mask_scope=args.mask_scope, learning_rate=args.learning_rate or DEFAULT_LR[args.peft_method],
        max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        caption_dropout=args.caption_dropout, lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=args.max_grad_norm, adam_weight_decay=args.adam_weight_decay, lora_rank=args.lora_rank,
        seed=args.seed,
    )
    if accelerator.is_main_process and args.report_to not in ("none", ""):
        accelerator.init_trackers("memcontrol", config={k: v for k, v in json.loads(config.to_json()).items()
                                                        if k != "mask"})
    log = fine_tune(unet, pipe.scheduler, latents, embeds, uncond, config, accelerator=accelerator, mask=mask)
    summary = {
        "peft_method": args.peft_method,
        "mask": unet.peft_config["default"].mask,
        "trainable_params": log["trainable_params"],
        "final_loss": log["final_loss"],
        "train_samples": len(latents),
        "wall_time_s": round(time.time() - started, 1),
    }
    save_adapter(unet, args.output_dir, extra_files={"training_config.json": config.to_json()})

    prompts = args.validation_prompts or sorted(set(captions))[:4]
    grid = pipe(prompts, num_images_per_prompt=args.num_validation_images, num_inference_steps=30,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(args.seed), output_type="pil").images
    from diffusers.utils import make_image_grid

    make_image_grid(grid, rows=len(prompts), cols=args.num_validation_images).save(
        os.path.join(args.output_dir, "validation.png"))
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    accelerator.end_training()
    print(json.dumps(summary, indent=2))
    print(f"adapter written to {os.path.abspath(args.output_dir)}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
