"""Pretrain the tiny Stable-Diffusion-shaped base pipeline shipped in ``diffusers_memcontrol/assets/tiny_base``.

The CPU stand-in for "SD1.5 pretrained on the web, then fine-tuned on chest X-rays": a pipeline with
SD1.5's shape, pretrained here on Fashion-MNIST (32x32 pixels, 8x8x4 latents), plus a small domain
CNN trained on handwritten digits (the quickstart's sensitive fine-tuning domain) whose penultimate
features stand in for the paper's chest X-ray DenseNet in FID / AMD.

Steps:

1. VAE (``build_vae``) on Fashion-MNIST train: MSE reconstruction + a small KL term. The latent
   ``scaling_factor`` = 1 / std of sampled latents on 4,096 training images, stored in the VAE
   config (SD1.5's 0.18215 was found the same way). Reconstruction PSNR is measured on the
   Fashion-MNIST test split and on the digits test split (out of domain, like X-rays for SD's VAE).
2. UNet (``build_unet``) with SD's epsilon-prediction loss on cached Fashion-MNIST latents
   (posterior mean/std cached once, a fresh latent sample per step), captions "a photo of a
   sneaker" etc., 10% of captions dropped to "" for classifier-free guidance. EMA weights are shipped.
   The text encoder is *frozen at its seeded random init*: SD's CLIP text encoder is frozen during
   fine-tuning too, so this mirrors the setting MemControl studies; a fixed random encoder is a
   fixed injective-ish map that sends distinct captions to distinct (far apart) embeddings, which
   is all the UNet needs to condition on (and to memorize per caption). Text embeddings are
   computed once per distinct caption.
3. ``DomainEncoder`` on digits train (random-shift augmentation); test accuracy on digits test.
4. Save the pipeline (``StableDiffusionPipeline.save_pretrained``, safetensors, no safety checker)
   and the encoder (``domain_encoder/``), ``pretraining_report.json``, ``samples.png`` (4 samples
   per Fashion-MNIST class, guidance 4, 50 steps, DDPM) and ``vae_reconstructions.png``.
5. The vocabulary stage (``--continue_from``): the UNet goes on training on Fashion-MNIST plus typeset digits
   (``tiny_base.printed_digits``) captioned like the digits domain. It never sees an image of the digits' splits.

Usage::

    python training/pretrain_tiny_base.py --output_dir /tmp/stage1   # stage 1
    python training/pretrain_tiny_base.py --continue_from /tmp/stage1 --unet_steps 800 --unet_lr 5e-4 \
        --digit_vocabulary 3000 --fashion_images 30000              # stage 2: the package's asset folder
    python training/pretrain_tiny_base.py --output_dir /tmp/tb --vae_steps 50 --unet_steps 50 --encoder_steps 50

Wall time (torch 2.13 CPU). Per-step costs measured on 2 idle cores: VAE 0.3 s, UNet 0.24 s at
batch 64, so the defaults should take about 14 minutes there (an estimate from those costs: VAE ~3 min, latent cache ~1 min, UNet
~10 min, encoder ~1 min, samples seconds). The shipped assets were made with
``--num_threads 1`` while other jobs shared the 2 cores: 23.5 minutes in total (VAE 330 s, latent
cache 68 s, UNet 946 s, encoder 58 s, samples 7 s; ``wall_time_s`` in ``pretraining_report.json``).
On a shared machine prefer ``--num_threads 1``: two processes each spinning 2 OpenMP threads on 2
cores ran 20-40x slower per step here. The vocabulary stage took about 4 minutes with 2 threads (``wall_time_s``
under ``vocabulary``). Reproducible for a given ``--seed``, thread count and torch
build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_memcontrol.data import tiny_base as tb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=tb.tiny_base_path(), help="where the pipeline is saved")
    p.add_argument("--vae_steps", type=int, default=600, help="VAE optimisation steps")
    p.add_argument("--unet_steps", type=int, default=2400, help="UNet optimisation steps")
    p.add_argument("--encoder_steps", type=int, default=300, help="DomainEncoder optimisation steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-4, help="KL weight (per-element means)")
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--encoder_lr", type=float, default=2e-3)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--psnr_images", type=int, default=2000, help="Fashion-MNIST test images for PSNR")
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    g = p.add_argument_group("vocabulary stage (--continue_from): the digits' vocabulary, never their images")
    g.add_argument("--continue_from", default=None,
                   help="A pipeline made by the first stage: keep its VAE, text encoder and domain encoder, and go on "
                        "training its UNet on Fashion-MNIST plus --digit_vocabulary typeset digits.")
    g.add_argument("--digit_vocabulary", type=int, default=3000,
                   help="Typeset digits (tiny_base.printed_digits) captioned like the digits domain.")
    g.add_argument("--fashion_images", type=int, default=30000, help="Fashion-MNIST training images beside them.")
    args = p.parse_args(argv)
    if args.continue_from is not None and args.continue_from == args.output_dir:
        p.error("--continue_from and --output_dir must differ: the first stage's folder is read while the new one "
                "is written")
    return args


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless shuffled index batches (epoch after epoch)."""
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.clamp(-1, 1) - y) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, device, bs: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(images), bs):
        x = tb.images_to_tensor(images[i : i + bs]).to(device)
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample.cpu())
    return torch.cat(out)


def to_grid(images: torch.Tensor, nrow: int, scale: int = 2) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 grayscale grid with ``nrow`` images per row."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte()[:, 0].numpy()
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2), np.uint8) + 128
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = x[k]
    return np.kron(grid, np.ones((scale, scale), np.uint8))


def save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, optimize=True)


def train_vae(args, vae, train_images, device):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    it = batches(len(train_images), args.batch_size, rng)
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="vae")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * cosine_lr(step, args.vae_steps, warmup=min(50, args.vae_steps // 10 + 1))
        x = tb.images_to_tensor(train_images[next(it)]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.vae_steps - 1:
            bar.set_postfix(mse=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    return float(rec.item()), float(kl.item())


@torch.no_grad()
def cache_latents(vae, images: np.ndarray, device, bs: int = 500):
    means, stds = [], []
    for i in tqdm(range(0, len(images), bs), desc="cache latents"):
        post = vae.encode(tb.images_to_tensor(images[i : i + bs]).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def embed_captions(tokenizer, text_encoder, captions, device) -> torch.Tensor:
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0].cpu()


def caption_separation(embeds: torch.Tensor) -> dict:
    """Pairwise L2 distances between caption embeddings, relative to their mean norm."""
    flat = embeds.flatten(1)
    d = torch.cdist(flat, flat) / flat.norm(dim=1).mean()
    off = d[~torch.eye(len(flat), dtype=torch.bool)]
    return {"min": round(float(off.min()), 4), "mean": round(float(off.mean()), 4)}


def train_unet(args, unet, scheduler, lat_mean, lat_std, scaling_factor, labels, text_table, device):
    """Epsilon-prediction training; ``text_table`` rows: one per class caption, last row = ""."""
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    rng = np.random.default_rng(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    it = batches(len(lat_mean), args.batch_size, rng)
    uncond = text_table.shape[0] - 1
    alphas = scheduler.alphas_cumprod
    unet.train()
    bar = tqdm(range(args.unet_steps), desc="unet")
    running = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = args.unet_lr * cosine_lr(step, args.unet_steps, warmup=min(100, args.unet_steps // 10 + 1))
        idx = next(it)
        b = len(idx)
        latents = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        latents = latents * scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
        rows = torch.from_numpy(labels[idx])
        drop = torch.rand(b, generator=gen) < args.caption_dropout
        rows = torch.where(drop, torch.full_like(rows, uncond), rows)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy.to(device), t.to(device), text_table[rows].to(device)).sample
        loss = F.mse_loss(pred.float(), noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0 or step == args.unet_steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
    unet.load_state_dict(ema)
    unet.eval().requires_grad_(False)
    return float(running)


def augment_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations (zero/-1 padded) of a batch in [-1, 1]."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_encoder(args, encoder, images, labels, device):
    opt = torch.optim.AdamW(encoder.parameters(), lr=args.encoder_lr, weight_decay=1e-2)
    rng = np.random.default_rng(args.seed + 2)
    gen = torch.Generator().manual_seed(args.seed + 2)
    it = batches(len(images), args.batch_size, rng)
    encoder.train()
    bar = tqdm(range(args.encoder_steps), desc="domain encoder")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = args.encoder_lr * cosine_lr(
                step, args.encoder_steps, warmup=min(20, args.encoder_steps // 10 + 1)
            )
        idx = next(it)
        x = augment_shift(tb.images_to_tensor(images[idx]), gen).to(device)
        loss = F.cross_entropy(encoder(x), torch.from_numpy(labels[idx]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    encoder.eval()


@torch.no_grad()
def accuracy(encoder, images, labels, device) -> float:
    logits = encoder(tb.images_to_tensor(images).to(device)).cpu()
    return float((logits.argmax(1).numpy() == labels).mean())


def write_model_card(output_dir: str, report: dict) -> None:
    """A short README.md for the asset folder: what it is, how it was made, its numbers."""
    r = report
    v = r.get("vocabulary")
    vocabulary = "" if v is None else "\n" + textwrap.fill(
        f"- Then its UNet went on for {v['args']['unet_steps']} steps on {v['data']}: the words and the look of "
        "digits, not the shape of each class (`vocabulary` in the report).", width=110, subsequent_indent="  ")
    text = f"""# tiny_base: a CPU-sized, Stable-Diffusion-1.5-shaped pipeline

Made by `training/pretrain_tiny_base.py` of diffusers-memcontrol; the stand-in for SD1.5 in the
package's quickstart and tests. Load it offline with
`StableDiffusionPipeline.from_pretrained(diffusers_memcontrol.data.tiny_base.tiny_base_path(), safety_checker=None)`.

- 32x32 pixels, 8x8x4 latents. UNet2DConditionModel ({r["unet"]["params"]:,} params; SD1.5 block types,
  1x1-conv proj_in/out, cross-attention dim 64), AutoencoderKL ({r["vae"]["params"]:,} params,
  scaling_factor {r["vae"]["scaling_factor"]}), CLIPTextModel ({r["text_encoder"]["params"]:,} params, frozen
  random init) with a byte-level 514-token CLIP tokenizer, DDPMScheduler with SD1.5's schedule.
- Pretrained on Fashion-MNIST (MIT), captions like "a photo of a sneaker", 10% captions dropped
  for classifier-free guidance. The diffusion components never saw an image of the digits (the
  quickstart's sensitive fine-tuning data); only the domain encoder below was trained on them.{vocabulary}
- VAE reconstruction PSNR: Fashion-MNIST test {r["psnr_fashion_mnist_test"]:.2f} dB, digits test
  {r["psnr_digits_test"]:.2f} dB (out of domain).
- `domain_encoder/`: a small CNN (`diffusers_memcontrol.data.tiny_base.DomainEncoder`) trained on the
  digits train split; test accuracy {r["domain_encoder_test_accuracy"]:.3f}; its
  {r["domain_encoder"]["feature_dim"]}-d penultimate features are the FID/AMD feature space.
- `samples.png`: 4 samples for each Fashion-MNIST class (rows of 8 = two classes), guidance
  {r["args"]["guidance_scale"]}, {r["args"]["sample_steps"]} steps. `vae_reconstructions.png`: rows = Fashion-MNIST test,
  reconstruction, digits test, reconstruction.
- `pretraining_report.json`: all numbers, arguments and wall times.

License: Apache-2.0 (weights); training data Fashion-MNIST (MIT) and scikit-learn digits (BSD-3-Clause).
"""
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


@torch.no_grad()
def save_samples(args, pipe, captions, name: str) -> None:
    """4 samples of each caption (rows of 8 = two captions) as `name` in the output folder."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe([c for c in captions for _ in range(4)], num_inference_steps=args.sample_steps,
               guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed),
               output_type="pt").images
    save_png(to_grid(out * 2 - 1, nrow=8), os.path.join(args.output_dir, name))


def vocabulary_stage(args) -> None:
    """Stage 2: the first stage's UNet goes on training on Fashion-MNIST plus typeset digits captioned like the
    digits domain. SD1.5 had seen some radiographs before anyone fine-tuned it on MIMIC; this base has seen digits
    that are no image of the fine-tuning splits, and it learns "a handwritten digit" without each class's shape."""
    from diffusers import StableDiffusionPipeline

    t_start = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.continue_from, safety_checker=None)
    f_train, f_labels = tb.load_domain_arrays("fashion-mnist", "train")
    keep = np.sort(np.random.default_rng(args.seed).choice(len(f_train), args.fashion_images, replace=False))
    printed, printed_labels = tb.printed_digits(args.digit_vocabulary, seed=args.seed)
    images = np.concatenate([f_train[keep], printed])
    labels = np.concatenate([f_labels[keep], printed_labels + 10])  # rows of the caption table below
    captions = [*tb.DOMAINS["fashion-mnist"].captions, *tb.DOMAINS["digits"].captions, ""]
    text_table = embed_captions(pipe.tokenizer, pipe.text_encoder, captions, args.device)
    lat_mean, lat_std = cache_latents(pipe.vae.to(args.device), images, args.device)
    unet = pipe.unet.to(args.device).train().requires_grad_(True)
    loss = train_unet(args, unet, pipe.scheduler, lat_mean, lat_std, pipe.vae.config.scaling_factor, labels,
                      text_table, args.device)
    pipe.to("cpu").save_pretrained(args.output_dir, safe_serialization=True)
    save_samples(args, pipe, tb.DOMAINS["fashion-mnist"].captions, "samples.png")
    save_samples(args, pipe, tb.DOMAINS["digits"].captions, "samples_digits.png")
    for sub in ("domain_encoder", "in_domain"):
        if os.path.isdir(os.path.join(args.continue_from, sub)):
            shutil.copytree(os.path.join(args.continue_from, sub), os.path.join(args.output_dir, sub),
                            dirs_exist_ok=True)
    with open(os.path.join(args.continue_from, "pretraining_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    report["vocabulary"] = {
        "args": {k: v for k, v in vars(args).items() if k in ("unet_steps", "unet_lr", "batch_size", "seed",
                 "ema_decay", "caption_dropout", "digit_vocabulary", "fashion_images", "num_threads")},
        "data": f"{args.fashion_images} Fashion-MNIST training images and {args.digit_vocabulary} typeset digits "
                "(tiny_base.printed_digits), the digits captioned 'a handwritten digit <word>'",
        "final_loss": round(loss, 5),
        "wall_time_s": round(time.time() - t_start, 1),
    }
    with open(os.path.join(args.output_dir, "pretraining_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    write_model_card(args.output_dir, report)
    print(json.dumps(report["vocabulary"], indent=2))


def main(argv=None):
    args = parse_args(argv)
    if args.continue_from is not None:
        torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        return vocabulary_stage(args)
    t_start = time.time()
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    times = {}
    report = {"args": {k: v for k, v in vars(args).items() if k != "output_dir"}}

    fashion = tb.DOMAINS["fashion-mnist"]
    f_train, f_train_y = tb.load_domain_arrays("fashion-mnist", "train")
    f_test, _ = tb.load_domain_arrays("fashion-mnist", "test")
    d_train, d_train_y = tb.load_domain_arrays("digits", "train")
    d_test, d_test_y = tb.load_domain_arrays("digits", "test")

    # 1. VAE ---------------------------------------------------------------------------------
    t0 = time.time()
    vae = tb.build_vae(args.seed).to(device)
    vae_mse, vae_kl = train_vae(args, vae, f_train, device)
    sample_idx = np.random.default_rng(args.seed).choice(len(f_train), 4096, replace=False)
    with torch.no_grad():
        post = vae.encode(tb.images_to_tensor(f_train[np.sort(sample_idx)]).to(device)).latent_dist
        z = post.sample(generator=torch.Generator(device).manual_seed(args.seed))
    scaling_factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    f_test = f_test[: args.psnr_images]
    f_rec = reconstruct(vae, f_test, device)
    d_rec = reconstruct(vae, d_test, device)
    psnr_f = psnr(f_rec, tb.images_to_tensor(f_test))
    psnr_d = psnr(d_rec, tb.images_to_tensor(d_test))
    times["vae"] = time.time() - t0
    print(
        f"VAE: scaling_factor={vae.config.scaling_factor:.4f}  PSNR fashion-mnist test={psnr_f:.2f} dB  "
        f"digits test={psnr_d:.2f} dB  ({times['vae']:.0f} s)"
    )
    k = 12
    save_png(
        to_grid(
            torch.cat([tb.images_to_tensor(f_test[:k]), f_rec[:k], tb.images_to_tensor(d_test[:k]), d_rec[:k]]), nrow=k
        ),
        os.path.join(args.output_dir, "vae_reconstructions.png"),
    )

    # 2. UNet --------------------------------------------------------------------------------
    t0 = time.time()
    tokenizer = tb.build_tokenizer()
    text_encoder = tb.build_text_encoder(args.seed).to(device).requires_grad_(False)
    text_table = embed_captions(tokenizer, text_encoder, list(fashion.captions) + [""], device)
    digit_embeds = embed_captions(tokenizer, text_encoder, tb.DOMAINS["digits"].captions, device)
    lat_mean, lat_std = cache_latents(vae, f_train, device)
    times["latent_cache"] = time.time() - t0
    t0 = time.time()
    scheduler = tb.build_scheduler()
    unet = tb.build_unet(args.seed).to(device)
    unet_loss = train_unet(
        args, unet, scheduler, lat_mean, lat_std, vae.config.scaling_factor, f_train_y, text_table, device
    )
    times["unet"] = time.time() - t0
    print(f"UNet: final EMA-smoothed loss {unet_loss:.4f} ({times['unet']:.0f} s)")

    # 3. Domain encoder ----------------------------------------------------------------------
    t0 = time.time()
    torch.manual_seed(args.seed + 3)
    encoder = tb.DomainEncoder(labels=list(tb.DOMAINS["digits"].labels)).to(device)
    train_encoder(args, encoder, d_train, d_train_y, device)
    acc = accuracy(encoder, d_test, d_test_y, device)
    times["domain_encoder"] = time.time() - t0
    print(f"DomainEncoder: digits test accuracy {acc:.4f} ({times['domain_encoder']:.0f} s)")

    # 4. Save --------------------------------------------------------------------------------
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu(),
        tokenizer=tokenizer,
        unet=unet.cpu(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    encoder.cpu().save_pretrained(os.path.join(args.output_dir, "domain_encoder"), safe_serialization=True)
    for root, _, files in os.walk(args.output_dir):  # safetensors writes 0600 files
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)

    # 5. Samples -----------------------------------------------------------------------------
    t0 = time.time()
    save_samples(args, pipe, fashion.captions, "samples.png")
    times["samples"] = time.time() - t0
    times["total"] = time.time() - t_start

    report.update(
        {
            "psnr_fashion_mnist_test": round(psnr_f, 3),
            "psnr_digits_test": round(psnr_d, 3),
            "domain_encoder_test_accuracy": round(acc, 4),
            "vae": {
                "scaling_factor": vae.config.scaling_factor,
                "final_train_mse": round(vae_mse, 5),
                "final_kl_per_element": round(vae_kl, 4),
                "params": sum(p.numel() for p in vae.parameters()),
            },
            "unet": {
                "final_loss": round(unet_loss, 5),
                "params": sum(p.numel() for p in unet.parameters()),
                "ema_decay": args.ema_decay,
            },
            "text_encoder": {
                "frozen_random_init_seed": args.seed,
                "params": sum(p.numel() for p in text_encoder.parameters()),
                "caption_separation_fashion": caption_separation(text_table[:-1]),
                "caption_separation_digits": caption_separation(digit_embeds),
            },
            "domain_encoder": {
                "feature_dim": encoder.config.feature_dim,
                "labels": list(encoder.config.labels),
                "train_domain": "digits",
                "test_size": len(d_test),
            },
            "psnr_fashion_mnist_test_images": len(f_test),
            "psnr_digits_test_images": len(d_test),
            "wall_time_s": {k: round(v, 1) for k, v in times.items()},
            "environment": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": args.num_threads,
                "device": str(device),
            },
        }
    )
    with open(os.path.join(args.output_dir, "pretraining_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    write_model_card(args.output_dir, report)
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("psnr_fashion_mnist_test", "psnr_digits_test", "domain_encoder_test_accuracy", "wall_time_s")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
