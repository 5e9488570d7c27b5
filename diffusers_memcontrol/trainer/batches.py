"""What the loop trains on: the frozen encoders, and `prepare_training_data`, which checks a dataset and encodes it
once (latent distributions and caption embeddings) through the content-addressed cache of `cache.py`.

It falls back to encoding on the fly where a cache would be wrong: random crops of non-square images, and captions
changed by random word augmentation (RWA) at a step. `--random_flip` stays cached: both orientations are cached.

The loop draws its micro-batches here (`Shuffler`, `StepDraws`, `draw_batch`, `Prefetcher`): every random draw of a step
comes from a generator seeded by (seed, step, process), and the data order of an epoch from (seed, epoch), so a run
resumed from a checkpoint continues exactly where the interrupted run was."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import (
    FileHashMemo,
    caption_key,
    default_cache_dir,
    latent_cache,
    model_identity,
    sha256_bytes,
    text_cache,
)
from ..data.columns import check_captions, check_columns
from ..data.encoding import _encode_prompts_on_device, default_resolution, encode_latent_distribution, encode_prompts
from ..data.images import ImageLoader, check_interpolation, scan_images, transform_image
from .config import FineTuneConfig


@dataclass
class TrainingData:
    """What the loop samples from: cached latent distributions and embeddings, or sources to encode on the fly.

    Latents: `latent_mean`/`latent_std` ([M, C, h, w], scaled) with `latent_rows` ([N, V] long: row of sample i
    unflipped, and flipped when V == 2); `latent_std` None means the latents are used as given. Or, on the fly,
    `images` (row -> PIL image) encoded by `vae` at every step.
    Captions: `prompt_embeds` ([U, L, D]) with `caption_rows` ([N]); or, on the fly, `captions` encoded by
    `text_encoder` at every step. `captions` are kept (in memory only, never written) for RWA.
    """

    num_samples: int
    uncond_embeds: torch.Tensor
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    latent_rows: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    caption_rows: torch.Tensor | None = None
    captions: list[str] | None = field(default=None, repr=False)
    images: Callable[[int], Any] | None = field(default=None, repr=False)
    resolution: int | None = None
    center_crop: bool = True
    interpolation: str = "lanczos"
    vae: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    text_encoder: Any = field(default=None, repr=False)
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("The training set is empty.")
        if self.latent_mean is None and (self.images is None or self.vae is None):
            raise ValueError("TrainingData needs cached latents (latent_mean) or images and a vae to encode them.")
        if self.prompt_embeds is None and (self.captions is None or self.text_encoder is None):
            raise ValueError("TrainingData needs cached prompt_embeds or captions and a text encoder.")
        if self.latent_mean is not None and self.latent_rows is None:
            if len(self.latent_mean) != self.num_samples:
                raise ValueError(f"Got {len(self.latent_mean)} latents for {self.num_samples} samples.")
            self.latent_rows = torch.arange(self.num_samples).unsqueeze(1)
        if self.prompt_embeds is not None and self.caption_rows is None:
            if len(self.prompt_embeds) != self.num_samples:
                raise ValueError(f"Got {len(self.prompt_embeds)} prompt embeddings for {self.num_samples} samples; "
                                 "they must match.")
            self.caption_rows = torch.arange(self.num_samples)
        if self.captions is not None and len(self.captions) != self.num_samples:
            raise ValueError(f"Got {len(self.captions)} captions for {self.num_samples} samples.")

    @property
    def cached_latents(self) -> bool:
        """Whether latents come from the cache (else they are encoded at every step)."""
        return self.latent_mean is not None

    @property
    def cached_text(self) -> bool:
        """Whether caption embeddings come from the cache (else they are encoded at every step)."""
        return self.prompt_embeds is not None

    @property
    def has_flip_variants(self) -> bool:
        """Whether flipped latents are cached too (random_flip with a cache)."""
        return self.latent_rows is not None and self.latent_rows.shape[1] == 2


def _compute_rows(keys: list[str], compute: Callable[[list[int]], dict], names: Sequence[str], batch_size: int,
                  desc: str, progress: bool) -> dict[str, torch.Tensor]:
    """In-memory counterpart of TensorCache.get_or_compute (cache='memory')."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in tqdm(range(0, len(keys), batch_size), desc=desc, disable=not progress or not keys, leave=False):
        result = compute(list(range(start, min(start + batch_size, len(keys)))))
        for n in names:
            parts[n].append(result[n].detach().cpu())
    return {n: torch.cat(v) for n, v in parts.items()}


def _cached_latents(loader: ImageLoader, infos: list, vae: Any, cache: str, root: str, stats: dict, *,
                    resolution: int, random_flip: bool, interpolation: str, model_path: str | None,
                    revision: str | None, batch_size: int, progress: bool) -> dict:
    """The latent distribution of each distinct image (and its flip with `random_flip`), from the disk cache or
    encoded in memory: `latent_mean`, `latent_std` and `latent_rows` of TrainingData. Records the cache in `stats`."""
    variants = (False, True) if random_flip else (False,)
    keys: list[str] = []
    first: dict[str, tuple[int, bool]] = {}  # key -> (first sample holding it, flipped)
    order: dict[str, int] = {}
    rows = torch.empty(len(infos), len(variants), dtype=torch.long)
    for i, info in enumerate(infos):
        for v, flip in enumerate(variants):
            key = sha256_bytes(f"{info.key}|flip".encode()) if flip else info.key
            if key not in order:
                order[key] = len(keys)
                first[key] = (i, flip)
                keys.append(key)
            rows[i, v] = order[key]

    def encode(positions: list[int]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([transform_image(loader(first[keys[p]][0]), resolution, True, first[keys[p]][1],
                                              interpolation=interpolation)
                              for p in positions])
        mean, std = encode_latent_distribution(vae, pixels)
        return {"mean": mean, "std": std}

    if cache == "disk":
        # every cached latent is a centre crop (square images are not cropped at all), whatever center_crop says
        store = latent_cache(root, model_identity(vae, model_path, revision), resolution,
                                       True, interpolation)
        tensors = store.get_or_compute(keys, encode, ("mean", "std"), batch_size, "cache latents", progress)
        stats["latent_cache"] = {"hits": store.hits, "misses": store.misses, "folder": store.folder}
    else:
        tensors = _compute_rows(keys, encode, ("mean", "std"), batch_size, "encode latents", progress)
    stats["latents"] = f"cached ({len(keys)} distinct entries)"
    return {"latent_mean": tensors["mean"], "latent_std": tensors["std"], "latent_rows": rows}


def _cached_captions(captions: list[str], tokenizer: Any, text_encoder: Any, cache: str, root: str, stats: dict, *,
                     model_path: str | None, revision: str | None, progress: bool) -> dict:
    """The embedding of each distinct caption, from the disk cache or encoded in memory: `prompt_embeds` and
    `caption_rows` of TrainingData. Records the cache in `stats`."""
    order: dict[str, int] = {}
    text_keys: list[str] = []
    unique: list[str] = []
    caption_rows = torch.empty(len(captions), dtype=torch.long)
    for i, caption in enumerate(captions):
        key = caption_key(caption)
        if key not in order:
            order[key] = len(text_keys)
            text_keys.append(key)
            unique.append(caption)
        caption_rows[i] = order[key]

    def encode_text(positions: list[int]) -> dict[str, torch.Tensor]:
        return {"embeds": encode_prompts(tokenizer, text_encoder, [unique[p] for p in positions])}

    if cache == "disk":
        store = text_cache(root, model_identity(text_encoder, model_path, revision,
                                                                    tokenizer=tokenizer))
        tensors = store.get_or_compute(text_keys, encode_text, ("embeds",), 256, "cache text embeddings", progress)
        stats["text_cache"] = {"hits": store.hits, "misses": store.misses, "folder": store.folder}
    else:
        tensors = _compute_rows(text_keys, encode_text, ("embeds",), 256, "encode captions", progress)
    stats["text"] = f"cached ({len(text_keys)} distinct captions)"
    return {"prompt_embeds": tensors["embeds"], "caption_rows": caption_rows}


def prepare_training_data(
    pipe: Any,
    dataset: Any,
    image_column: str = "image",
    caption_column: str = "text",
    *,
    resolution: int | None = None,
    center_crop: bool = False,
    random_flip: bool = False,
    interpolation: str = "lanczos",
    cache: str = "disk",
    cache_dir: str | None = None,
    model_path: str | None = None,
    revision: str | None = None,
    encode_batch_size: int = 64,
    progress: bool = True,
) -> TrainingData:
    """Check a dataset (columns, captions, every image) and encode it once, through the disk cache when possible.

    `interpolation` is the resampling of the resize (`FineTuneConfig.image_interpolation_mode`).
    `cache`: "disk" (content-addressed cache under `cache_dir`, reused across runs and search trials), "memory"
    (encode once per run, write nothing) or "off" (encode every step). Non-square images without `center_crop` are
    randomly cropped at every step, so their latents are encoded on the fly whatever `cache` says.
    """
    if cache not in ("disk", "memory", "off"):
        raise ValueError(f"cache must be disk, memory or off, got {cache!r}.")
    check_interpolation(interpolation)
    check_columns(dataset, {"image_column": image_column, "caption_column": caption_column})
    captions = check_captions(dataset[caption_column], caption_column)
    vae, tokenizer, text_encoder = pipe.vae, pipe.tokenizer, pipe.text_encoder
    resolution = int(resolution or default_resolution(pipe.unet, vae))
    root = cache_dir or default_cache_dir()
    memo = FileHashMemo(os.path.join(root, "file_hashes.sqlite")) if cache == "disk" else None
    try:
        infos = scan_images(dataset, image_column, memo=memo, decode=cache == "off", progress=progress)
    finally:
        if memo is not None:
            memo.close()
    random_crop = not center_crop and any(w != h for w, h in (i.size for i in infos))
    loader = ImageLoader(dataset, image_column)
    uncond = encode_prompts(tokenizer, text_encoder, [""])[0]
    stats = {"samples": len(infos), "cache": cache, "random_crop": random_crop}
    data = {"num_samples": len(infos), "uncond_embeds": uncond, "captions": captions, "resolution": resolution,
            "interpolation": interpolation, "center_crop": center_crop or not random_crop, "vae": vae, "tokenizer": tokenizer,
            "text_encoder": text_encoder}

    if cache == "off" or random_crop:
        data["images"] = loader
        if random_crop and cache != "off":
            stats["latents"] = "on the fly (random crops of non-square images; pass --center_crop to cache them)"
        else:
            stats["latents"] = "on the fly"
    else:
        data.update(_cached_latents(loader, infos, vae, cache, root, stats, resolution=resolution,
                                    random_flip=random_flip, interpolation=interpolation, model_path=model_path,
                                    revision=revision, batch_size=encode_batch_size, progress=progress))
    if cache == "off":
        stats["text"] = "on the fly"
    else:
        data.update(_cached_captions(captions, tokenizer, text_encoder, cache, root, stats, model_path=model_path,
                                     revision=revision, progress=progress))
    return TrainingData(stats=stats, **data)


def _seed_from(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, step, process, ...)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0] % 2**63)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `_seed_from(*parts)`: one stream (STREAM_*) of one step, epoch or process."""
    return torch.Generator().manual_seed(_seed_from(*parts))


STREAM_STEP, STREAM_EPOCH, STREAM_CROP = 0, 1, 2


class StepDraws:
    """The random draws of one global micro-batch from one generator, in the order they are asked for; each process
    keeps its own rows, so K processes with batch B draw what one process with batch K x B draws."""

    def __init__(self, gen: torch.Generator, n: int, shard: tuple[int, int] = (0, 1)):
        process_index, self.num_processes = shard
        self.gen, self.n, self.mine = gen, n, slice(process_index * n, (process_index + 1) * n)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) draws of this process's rows."""
        return torch.rand(self.n * self.num_processes, *shape, generator=self.gen)[self.mine]

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal draws of this process's rows."""
        return torch.randn(self.n * self.num_processes, *shape, generator=self.gen)[self.mine]

    def randint(self, high: int) -> torch.Tensor:
        """Integers in [0, high) of this process's rows."""
        return torch.randint(0, high, (self.n * self.num_processes,), generator=self.gen)[self.mine]

    def seed(self) -> int:
        """One seed for a whole micro-batch (the RWA words)."""
        return int(torch.randint(0, 2**62, (1,), generator=self.gen))


def conditioning(data: TrainingData, idx: torch.Tensor, drop: torch.Tensor, rwa, rwa_seed: int | None
                 ) -> tuple[torch.Tensor, int]:
    """Per-sample text embeddings (CPU float): cached where the caption is unchanged, encoded where RWA changed it."""
    n = len(idx)
    captions = [data.captions[int(i)] for i in idx] if data.captions is not None else None
    changed = [False] * n
    if rwa is not None:
        augmented = rwa.apply_batch(captions, np.random.default_rng(rwa_seed))
        changed = [a != c for a, c in zip(augmented, captions)]
        captions = augmented
    if data.cached_text:
        cond = data.prompt_embeds[data.caption_rows[idx]].float().clone()
    else:
        cond = data.uncond_embeds.float().unsqueeze(0).repeat(n, 1, 1)
    need = [j for j in range(n) if not drop[j] and (changed[j] or not data.cached_text)]
    if need:
        encoded = _encode_prompts_on_device(data.tokenizer, data.text_encoder, [captions[j] for j in need])
        cond[need] = encoded.float().cpu()
    if drop.any():
        cond[drop] = data.uncond_embeds.float().to(cond.dtype)
    return cond, sum(1 for j in range(n) if changed[j] and not drop[j])


def batch_pixels(data: TrainingData, config: FineTuneConfig, idx: torch.Tensor, micro: int, shard: tuple[int, int]
                 ) -> torch.Tensor:
    """The transformed images of one micro-batch, with the flips and crops its seeds draw (encoding on the fly).

    `shard` (process_index, num_processes): flips are this process's rows of the global micro-batch's draws."""
    n = len(idx)
    process_index, num_processes = shard
    gen = seeded_generator(config.seed, STREAM_STEP, micro, 0)  # flips: the step generator's first draws
    mine = slice(process_index * n, (process_index + 1) * n)
    flips = (torch.rand(n * num_processes, generator=gen)[mine] < 0.5 if config.random_flip
             else torch.zeros(n, dtype=torch.bool))
    crop_gen = seeded_generator(config.seed, STREAM_CROP, micro, process_index)
    return torch.stack([transform_image(data.images(int(i)), data.resolution, data.center_crop, bool(f), crop_gen,
                                        data.interpolation) for i, f in zip(idx, flips)])


class Prefetcher:
    """`produce(key)` for the keys `first, first + 1, ...` in order, computed up to 2 x `num_workers` keys ahead by
    threads (num_workers 0: computed when asked)."""

    def __init__(self, produce: Callable[[int], Any], stop: int, num_workers: int):
        self.produce, self.stop, self.futures = produce, stop, {}
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.ahead = 2 * num_workers

    def get(self, key: int) -> Any:
        """The value of `key`, queueing the keys that follow it."""
        if self.pool is None:
            return self.produce(key)
        for upcoming in range(key, min(key + self.ahead + 1, self.stop)):
            if upcoming not in self.futures:
                self.futures[upcoming] = self.pool.submit(self.produce, upcoming)
        return self.futures.pop(key).result()

    def close(self) -> None:
        """Stop the threads (queued work is dropped)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def draw_batch(data: TrainingData, idx: torch.Tensor, config: FineTuneConfig, draws: StepDraws,
               pixels: torch.Tensor | None, rwa) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The clean latents (a sample of the VAE posterior) and text embeddings of a micro-batch, drawn first from the
    step's `draws` (flips, caption dropout, RWA), so that cached and on-the-fly runs agree; and the captions RWA changed.

    `pixels`: the micro-batch's transformed images (`batch_pixels`) when latents are encoded on the fly."""
    flips = draws.rand() < 0.5 if config.random_flip else torch.zeros(len(idx), dtype=torch.bool)
    drop = draws.rand() < config.caption_dropout
    rwa_seed = draws.seed() if rwa is not None else None
    if data.cached_latents:
        if config.random_flip and not data.has_flip_variants:
            raise ValueError("random_flip needs flipped latents: prepare the data with random_flip=True.")
        rows = data.latent_rows[idx, flips.long()] if data.has_flip_variants else data.latent_rows[idx, 0]
        mean = data.latent_mean[rows].float()
        std = data.latent_std[rows].float() if data.latent_std is not None else None
    else:
        mean, std = encode_latent_distribution(data.vae, pixels)
    latents = mean + std * draws.randn(*mean.shape[1:]) if std is not None else mean
    cond, augmented = conditioning(data, idx, drop, rwa, rwa_seed)
    return latents, cond, augmented


class Shuffler:
    """The sample indices of each micro-batch of this process: a permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, seed: int, num_samples: int, batch: int, batches_per_epoch: int, num_processes: int,
                 process_index: int):
        self.seed, self.num_samples, self.batch, self.batches_per_epoch = seed, num_samples, batch, batches_per_epoch
        self.num_processes, self.process_index = num_processes, process_index
        self.permutations: dict[int, torch.Tensor] = {}

    def indices(self, micro: int) -> torch.Tensor:
        """The indices of micro-batch `micro` (counted from the start of the run)."""
        batch = self.batch
        epoch, k = divmod(micro, self.batches_per_epoch)
        if epoch not in self.permutations:
            self.permutations.clear()
            self.permutations[epoch] = torch.randperm(self.num_samples,
                                                      generator=seeded_generator(self.seed, STREAM_EPOCH, epoch))
        perm = self.permutations[epoch]
        if self.num_processes == 1:
            return perm[k * batch:(k + 1) * batch]
        # every process gets a full batch (the last one wraps around), as accelerate's even_batches
        return perm[(k * batch * self.num_processes + self.process_index * batch + torch.arange(batch))
                    % self.num_samples]


def training_data_from_tensors(latents: torch.Tensor, prompt_embeds: torch.Tensor, uncond_embeds: torch.Tensor
                               ) -> TrainingData:
    """TrainingData of fixed latents (used as given, no posterior sampling) and per-sample prompt embeddings."""
    if len(latents) != len(prompt_embeds):
        raise ValueError(f"Got {len(latents)} latents but {len(prompt_embeds)} prompt embeddings; they must match.")
    if len(latents) == 0:
        raise ValueError("The training set is empty.")
    uncond = uncond_embeds[0] if uncond_embeds.dim() == 3 else uncond_embeds
    return TrainingData(num_samples=len(latents), uncond_embeds=uncond, latent_mean=latents,
                        prompt_embeds=prompt_embeds)
