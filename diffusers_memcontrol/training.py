"""The fine-tuning loop as a library function, shared by `training/train_memcontrol.py` and search trials.

A search trial (or the script) does, in this order::

    data = prepare_training_data(pipe, dataset, "image", "text", cache_dir=...)   # once per dataset and worker
    unet = copy.deepcopy(base_unet)                                                # a UNet without adapter
    result = train(unet, pipe.scheduler, data, FineTuneConfig(peft_method="svdiff", mask=mask.to_dict()),
                   accelerator=accelerator, output_dir=..., checkpointing_steps=...)
    save_adapter(unet, output_dir)

The VAE and the text encoder are frozen, so `prepare_training_data` encodes each distinct image once into its latent
*distribution* (mean and std; the loop samples from it at every step, as diffusers does when it encodes on the fly)
and each distinct caption once into its embedding, through the content-addressed disk cache of `cache.py`. It falls
back to encoding on the fly where a cache would be wrong: random crops of non-square images, and captions changed by
random word augmentation (RWA) at a step. `--random_flip` stays cached: both orientations are cached.

Every random draw of a step comes from a generator seeded by (seed, step, process), and the data order of an epoch
from (seed, epoch), so a run resumed from a checkpoint continues exactly where the interrupted run was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .columns import check_captions, check_columns
from .files import (
    atomic_path,
    usual_mode,
    write_json_atomic,  # noqa: F401 (the name training/train_memcontrol.py imports)
)
from .images import INTERPOLATIONS, ImageLoader, check_interpolation, scan_images, transform_image
from .masks import BUILTIN_PREFIX, LAYOUTS, SCOPES, Mask, MaskSpace, builtin_mask, trainable_parameters
from .masks import METHODS as PEFT_METHODS
from .mitigation import MITIGATIONS
from .tuners import MemControlConfig

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DEFAULT_LR = {"svdiff": 1e-3, "difffit": 1e-3, "lora": 1e-4, "attention": 1e-5, "full": 1e-5, "freeze": 1e-3}
CHECKPOINT_PREFIX = "checkpoint-"


# --------------------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class FineTuneConfig:
    """Hyper-parameters of one MemControl fine-tune; round-trips to JSON (`to_json` / `from_json`).

    Names and meanings follow diffusers' train_text_to_image.py where it has them.
    """

    peft_method: str = field(default="svdiff", metadata={"help": "The PEFT method to train.", "choices": PEFT_METHODS})
    mask: dict | None = field(default=None, metadata={"help": "Mask JSON dict; None = all ones."})
    mask_layout: str = field(default="paper", metadata={
        "help": "Mask positions: paper (the paper's search space), blocks (one per transformer block) or attention "
                "(self/cross attention of each block).", "choices": LAYOUTS})
    mask_scope: str = field(default="reference", metadata={
        "help": "reference (the reference code's parameter set) or strict (only the masked blocks).",
        "choices": SCOPES})
    learning_rate: float = field(default=1e-3, metadata={"help": "Initial learning rate (after warm-up)."})
    scale_lr: bool = field(default=False, metadata={
        "help": "Scale the learning rate by gradient accumulation steps x batch size x number of processes."})
    max_train_steps: int | None = field(default=400, metadata={
        "help": "Optimizer steps; None = num_train_epochs x steps per epoch."})
    num_train_epochs: int | None = field(default=None, metadata={
        "help": "Epochs, used when max_train_steps is None."})
    train_batch_size: int = field(default=32, metadata={"help": "Samples per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    caption_dropout: float = field(default=0.0, metadata={
        "help": "Probability of replacing a caption by the empty one (classifier-free guidance); diffusers' script "
                "has none, so 0 by default."})
    lr_scheduler: str = field(default="constant", metadata={"help": "Learning-rate schedule.",
                                                            "choices": LR_SCHEDULERS})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the learning-rate scheduler."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    adam_weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (0 by default: decay would pull DiffFit gammas, initialised at 1, to 0)."})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes' 8-bit AdamW."})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR weighting gamma (5.0 recommended)."})
    noise_offset: float = field(default=0.0, metadata={"help": "Scale of the per-channel noise offset."})
    input_perturbation: float = field(default=0.0, metadata={
        "help": "Scale of the input perturbation: the noisy latents get noise + this x N(0, 1), the target keeps the "
                "noise (diffusers recommends 0.1)."})
    dream_training: bool = field(default=False, metadata={
        "help": "DREAM (Zhou et al. 2024): a no-grad prediction corrects the noisy latents and the target "
                "(diffusers.training_utils.compute_dream_and_update_latents)."})
    dream_detail_preservation: float = field(default=1.0, metadata={
        "help": "DREAM's detail preservation factor p (>= 0)."})
    prediction_type: str | None = field(default=None, metadata={
        "help": "Training target; default: the scheduler's.", "choices": ("epsilon", "v_prediction")})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the trainable adapter tensors; saved."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (diffusers' EMAModel warm-up applies)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for UNet activation memory."})
    random_flip: bool = field(default=False, metadata={"help": "Flip images horizontally with probability 0.5."})
    image_interpolation_mode: str = field(default="lanczos", metadata={
        "help": "Resampling of the shorter-side resize (as diffusers' train_text_to_image.py).",
        "choices": tuple(INTERPOLATIONS)})
    mitigation: str = field(default="none", metadata={
        "help": "Memorization mitigation during training: none, rwa (random word addition) or threshold.",
        "choices": MITIGATIONS})
    rwa_num_words: int = field(default=4, metadata={"help": "RWA: random words inserted per caption."})
    rwa_prob: float = field(default=1.0, metadata={"help": "RWA: probability a caption is augmented."})
    threshold: float | str = field(default="auto", metadata={
        "help": "Threshold mitigation: drop samples whose noise-prediction norm is >= this; 'auto' = batch quantile."})
    threshold_quantile: float = field(default=0.9, metadata={"help": "Quantile used by threshold 'auto'."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (peft_method lora)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, noise, dropout and augmentation."})

    def __post_init__(self) -> None:
        if self.peft_method not in PEFT_METHODS:
            raise ValueError(f"Unknown peft_method {self.peft_method!r}; expected one of {', '.join(PEFT_METHODS)}.")
        if self.max_train_steps is None and self.num_train_epochs is None:
            raise ValueError("Give max_train_steps or num_train_epochs.")
        if self.max_train_steps is not None and self.max_train_steps < 0:
            raise ValueError(f"max_train_steps must be >= 0, got {self.max_train_steps}.")
        if self.num_train_epochs is not None and self.num_train_epochs < 0:
            raise ValueError(f"num_train_epochs must be >= 0, got {self.num_train_epochs}.")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"Unknown lr_scheduler {self.lr_scheduler!r}; expected one of {', '.join(LR_SCHEDULERS)}.")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {self.snr_gamma}.")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}.")
        if self.mitigation not in MITIGATIONS:
            raise ValueError(f"Unknown mitigation {self.mitigation!r}; expected one of {', '.join(MITIGATIONS)}.")
        if not 0.0 <= self.rwa_prob <= 1.0:
            raise ValueError(f"rwa_prob must be in [0, 1], got {self.rwa_prob}.")
        if self.rwa_num_words < 0:
            raise ValueError(f"rwa_num_words must be >= 0, got {self.rwa_num_words}.")
        self.threshold = parse_threshold(self.threshold)
        check_interpolation(self.image_interpolation_mode)
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}.")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}.")
        if self.input_perturbation < 0 or self.dream_detail_preservation < 0:
            raise ValueError(f"input_perturbation and dream_detail_preservation must be >= 0, got "
                             f"{self.input_perturbation} and {self.dream_detail_preservation}.")

    def to_json(self) -> str:
        """JSON text of every field."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FineTuneConfig:
        """Inverse of `to_json` (unknown keys from newer versions are ignored)."""
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def adapter_config(self, mask: Mask | None = None) -> MemControlConfig:
        """The peft config of this fine-tune."""
        mask = mask or (Mask.from_dict(self.mask) if self.mask else None)
        return MemControlConfig(method=self.peft_method, mask=mask, mask_layout=self.mask_layout,
                                mask_scope=self.mask_scope, lora_rank=self.lora_rank, lora_alpha=self.lora_rank)


def parse_threshold(value: float | str) -> float | str:
    """A threshold given as a number, a numeric string or "auto" -> float or "auto" (clear error otherwise)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f'threshold must be a positive number or "auto", got {value!r}.') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f'threshold must be a positive number or "auto", got {value!r}.')
    return float(value)


# --------------------------------------------------------------------------------------------------------------------
# masks and adapters
# --------------------------------------------------------------------------------------------------------------------
def resolve_mask(spec: str | None, unet: torch.nn.Module, method: str | None, layout: str) -> Mask | None:
    """Turn a `--mask` value (None, a bit string, a mask JSON file, a folder or a Hub repo holding one, a built-in
    mask `memcontrol:<name>`) into a Mask.

    A stored mask is re-targeted to `method` when its positions fit; `method=None` keeps the stored method.
    """
    if spec is None or spec == "":
        return None
    if spec.startswith(BUILTIN_PREFIX):  # a mask shipped with the package (`memcontrol masks` lists them)
        return builtin_mask(spec).fit(unet, method)
    if not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):  # a Hub repo holding a published mask
        from .hub import download_memcontrol

        spec = download_memcontrol(spec, require_adapter=False)
    if os.path.exists(spec):
        mask = Mask.load(spec)
        if method is not None and mask.method != method:
            # a mask transfers across methods only when positions agree (same layout on the same architecture)
            mask = Mask(method, mask.layout, mask.positions, mask.bits)
        return MaskSpace.from_unet(unet, method=mask.method, layout=mask.layout).validate(mask)
    if method is None:
        raise ValueError(f"--mask {spec!r} is not a mask file, folder or Hub repo; a bit string needs a PEFT method.")
    space = MaskSpace.from_unet(unet, method=method, layout=layout)
    if set(spec) <= set("01, _"):
        return space.mask(spec)
    raise ValueError(f"--mask {spec!r} is neither a file, a folder, nor a bit string of length {len(space)}.")


def save_adapter(unet: torch.nn.Module, output_dir: str, adapter_name: str = "default", extra_files: dict | None = None
                 ) -> None:
    """Write the adapter in peft format (adapter_config.json + adapter_model.safetensors + mask.json) atomically.

    Files are written into a temporary folder next to `output_dir` and moved in place one by one with `os.replace`,
    so a crash never leaves a half-written adapter file. Non-finite adapter tensors are refused.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config: MemControlConfig = unet.peft_config[adapter_name]
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
        unet, adapter_name=adapter_name).items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"Refusing to write an adapter with NaN/inf tensors ({bad[:3]}).")
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=output_dir)
    try:
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        mask = config.get_mask()
        if mask is not None:
            mask.save(os.path.join(tmp, "mask.json"))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        for name in os.listdir(tmp):
            usual_mode(os.path.join(tmp, name))
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_config(adapter_dir: str) -> MemControlConfig:
    """The MemControlConfig saved in `adapter_dir` (clear errors for a missing or non-MemControl adapter)."""
    from peft import PeftConfig

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter_dir!r} has no adapter_config.json: not an adapter folder.")
    config = PeftConfig.from_pretrained(adapter_dir)
    if not isinstance(config, MemControlConfig):
        raise ValueError(  # noqa: TRY004 - kept a ValueError (bad input folder), as before
            f"{adapter_dir!r} holds a {type(config).__name__}, not a MemControl adapter.")
    return config


def check_adapter_fits(unet: torch.nn.Module, adapter_dir: str) -> MemControlConfig:
    """Check, without touching `unet`, that the adapter in `adapter_dir` was made for this UNet's architecture."""
    config = read_adapter_config(adapter_dir)
    mask = config.get_mask()
    if mask is not None:
        try:
            MaskSpace.from_unet(unet, method=config.method, layout=mask.layout).validate(mask)
        except ValueError as err:
            raise ValueError(f"The adapter in {adapter_dir!r} was trained for another base model: {err}") from None
    return config


def load_adapter(unet: torch.nn.Module, adapter_dir: str, adapter_name: str = "default") -> MemControlConfig:
    """Load a saved MemControl adapter folder into `unet` (checked before any weight moves); return its config.

    The same checks and loading as `pipe.load_memcontrol_adapter` (`loaders.load_unet_adapter`), local folder only.
    """
    from .loaders import load_unet_adapter

    name = load_unet_adapter(unet, adapter_dir, adapter_name=adapter_name, local_files_only=True)
    return unet.peft_config[name]


# --------------------------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Text embeddings (last hidden state, as Stable Diffusion uses) of `captions`, float32 on the CPU."""
    out = [_encode_prompts_on_device(tokenizer, text_encoder, captions[i:i + batch_size]).float().cpu()
           for i in range(0, len(captions), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _encode_prompts_on_device(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, batch_size: int = 64, generator: Any = None) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1] (a sample of the posterior, as diffusers' training script does)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", leave=False,
                  disable=len(images) <= 4 * batch_size):
        batch = images[i:i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.sample(generator).float().cpu() * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def encode_latent_distribution(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mean and std of the VAE posterior of images in [-1, 1]: latents = mean + std * N(0, 1)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean.float() - shift) * scale).cpu(), (dist.std.float() * scale).cpu()


def default_resolution(unet: Any, vae: Any) -> int:
    """Pixel resolution the UNet was built for: its sample size x the VAE's downsampling factor."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------------------------------
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
    from . import cache as cache_mod

    if cache not in ("disk", "memory", "off"):
        raise ValueError(f"cache must be disk, memory or off, got {cache!r}.")
    check_interpolation(interpolation)
    check_columns(dataset, {"image_column": image_column, "caption_column": caption_column})
    captions = check_captions(dataset[caption_column], caption_column)
    vae, tokenizer, text_encoder = pipe.vae, pipe.tokenizer, pipe.text_encoder
    resolution = int(resolution or default_resolution(pipe.unet, vae))
    root = cache_dir or cache_mod.default_cache_dir()
    memo = cache_mod.FileHashMemo(os.path.join(root, "file_hashes.sqlite")) if cache == "disk" else None
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
        variants = (False, True) if random_flip else (False,)
        keys: list[str] = []
        first: dict[str, tuple[int, bool]] = {}  # key -> (first sample holding it, flipped)
        order: dict[str, int] = {}
        rows = torch.empty(len(infos), len(variants), dtype=torch.long)
        for i, info in enumerate(infos):
            for v, flip in enumerate(variants):
                key = cache_mod.sha256_bytes(f"{info.key}|flip".encode()) if flip else info.key
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
            store = cache_mod.latent_cache(root, cache_mod.model_identity(vae, model_path, revision), resolution,
                                           True, interpolation)
            tensors = store.get_or_compute(keys, encode, ("mean", "std"), encode_batch_size, "cache latents",
                                           progress)
            stats["latent_cache"] = {"hits": store.hits, "misses": store.misses, "folder": store.folder}
        else:
            tensors = _compute_rows(keys, encode, ("mean", "std"), encode_batch_size, "encode latents", progress)
        data.update(latent_mean=tensors["mean"], latent_std=tensors["std"], latent_rows=rows)
        stats["latents"] = f"cached ({len(keys)} distinct entries)"

    if cache == "off":
        stats["text"] = "on the fly"
    else:
        order = {}
        text_keys: list[str] = []
        unique: list[str] = []
        caption_rows = torch.empty(len(captions), dtype=torch.long)
        for i, caption in enumerate(captions):
            key = cache_mod.caption_key(caption)
            if key not in order:
                order[key] = len(text_keys)
                text_keys.append(key)
                unique.append(caption)
            caption_rows[i] = order[key]

        def encode_text(positions: list[int]) -> dict[str, torch.Tensor]:
            return {"embeds": encode_prompts(tokenizer, text_encoder, [unique[p] for p in positions])}

        if cache == "disk":
            store = cache_mod.text_cache(root, cache_mod.model_identity(text_encoder, model_path, revision,
                                                                        tokenizer=tokenizer))
            tensors = store.get_or_compute(text_keys, encode_text, ("embeds",), 256, "cache text embeddings",
                                           progress)
            stats["text_cache"] = {"hits": store.hits, "misses": store.misses, "folder": store.folder}
        else:
            tensors = _compute_rows(text_keys, encode_text, ("embeds",), 256, "encode captions", progress)
        data.update(prompt_embeds=tensors["embeds"], caption_rows=caption_rows)
        stats["text"] = f"cached ({len(text_keys)} distinct captions)"
    return TrainingData(stats=stats, **data)


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


# --------------------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------------------
def _seed_from(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, step, process, ...)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0] % 2**63)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_from(*parts))


_STREAM_STEP, _STREAM_EPOCH, _STREAM_CROP, _STREAM_EVAL = 0, 1, 2, 3


class TrainState:
    """Position and counters of a run (checkpointed with accelerate, so a resumed run continues exactly)."""

    def __init__(self, mitigation=None):
        self.global_step = 0
        self.micro_step = 0
        self.losses: list[float] = []
        self.skipped_steps = 0
        self.skipped_micro_batches = 0
        self.augmented_captions = 0
        self.mitigation = mitigation

    def state_dict(self) -> dict:
        """Plain-Python state (no tensors, no captions)."""
        counters = {}
        if self.mitigation is not None:
            counters = {k: getattr(self.mitigation, k) for k in
                        ("steps", "skipped_steps", "seen_samples", "dropped_samples")}
        return {"global_step": self.global_step, "micro_step": self.micro_step, "losses": list(self.losses),
                "skipped_steps": self.skipped_steps, "skipped_micro_batches": self.skipped_micro_batches,
                "augmented_captions": self.augmented_captions, "threshold_counters": counters}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of `state_dict`."""
        self.global_step = int(state["global_step"])
        self.micro_step = int(state["micro_step"])
        self.losses = [float(x) for x in state["losses"]]
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_micro_batches = int(state["skipped_micro_batches"])
        self.augmented_captions = int(state["augmented_captions"])
        if self.mitigation is not None:
            for k, v in state.get("threshold_counters", {}).items():
                setattr(self.mitigation, k, v)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete `checkpoint-<step>` folders of `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir)
             if (m := re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def resolve_checkpoint(output_dir: str | None, spec: str | None) -> str | None:
    """`--resume_from_checkpoint` value -> folder: "latest" (None when there is none yet), a path, or a name."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir) if output_dir else []
        return found[-1] if found else None
    for candidate in (spec, os.path.join(output_dir or "", spec)):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"Checkpoint {spec!r} not found (looked for it as a path and inside {output_dir!r}).")


def _save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """accelerator.save_state into a temporary folder renamed to checkpoint-<step> (never half-written)."""
    existing = list_checkpoints(output_dir)
    if total_limit is not None and total_limit > 0:
        for old in existing[:max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}-", dir=output_dir)
    try:
        accelerator.save_state(tmp)
        usual_mode(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def _make_optimizer(params: list, config: FineTuneConfig, lr: float):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
               eps=config.adam_epsilon)


def summarize_losses(losses: Sequence[float]) -> dict:
    """First/last/min/mean losses and the mean over the last 10% of steps (numbers only)."""
    if not len(losses):
        return {"steps": 0}
    arr = np.asarray(losses, dtype=np.float64)
    tail = arr[-max(1, len(arr) // 10):]
    return {"steps": len(arr), "first": float(arr[0]), "last": float(arr[-1]), "min": float(arr.min()),
            "mean": float(arr.mean()), "mean_last_10pct": float(tail.mean())}


def _release(accelerator, objects: Sequence[Any]) -> None:
    """Forget what train() handed to the accelerator, so one process can run many trials."""
    for attr in ("_models", "_optimizers", "_schedulers", "_custom_objects"):
        items = getattr(accelerator, attr, None)
        if isinstance(items, list):
            items[:] = [o for o in items if not any(o is x for x in objects)]


class _Batch:
    """One micro-batch on the device, plus bookkeeping."""

    def __init__(self, noisy, timesteps, cond, target, augmented, noise):
        self.noisy, self.timesteps, self.cond, self.target, self.augmented = noisy, timesteps, cond, target, augmented
        self.noise = noise


def _conditioning(data: TrainingData, idx: torch.Tensor, drop: torch.Tensor, rwa, rwa_seed: int | None
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


def _pixels(data: TrainingData, config: FineTuneConfig, idx: torch.Tensor, micro: int, process_index: int
            ) -> torch.Tensor:
    """The transformed images of one micro-batch, with the flips and crops its seeds draw (encoding on the fly)."""
    n = len(idx)
    gen = _generator(config.seed, _STREAM_STEP, micro, process_index)  # flips: the first draws of the step's generator
    flips = torch.rand(n, generator=gen) < 0.5 if config.random_flip else torch.zeros(n, dtype=torch.bool)
    crop_gen = _generator(config.seed, _STREAM_CROP, micro, process_index)
    return torch.stack([transform_image(data.images(int(i)), data.resolution, data.center_crop, bool(f), crop_gen,
                                        data.interpolation) for i, f in zip(idx, flips)])


class _Prefetcher:
    """`produce(key)` for the keys `first, first + 1, ...` in order, computed up to 2 x `num_workers` keys ahead by
    threads (num_workers 0: computed when asked)."""

    def __init__(self, produce: Callable[[int], Any], stop: int, num_workers: int):
        from concurrent.futures import ThreadPoolExecutor

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


def _micro_batch(data: TrainingData, idx: torch.Tensor, config: FineTuneConfig, noise_scheduler, gen: torch.Generator,
                 pixels: torch.Tensor | None, rwa, device) -> _Batch:
    """Draw everything random of one micro-batch from `gen` in a fixed order, so cached and on-the-fly runs agree.

    `pixels`: the micro-batch's transformed images (`_pixels`) when latents are encoded on the fly."""
    n = len(idx)
    flips = torch.rand(n, generator=gen) < 0.5 if config.random_flip else torch.zeros(n, dtype=torch.bool)
    drop = torch.rand(n, generator=gen) < config.caption_dropout
    rwa_seed = int(torch.randint(0, 2**62, (1,), generator=gen)) if rwa is not None else None
    if data.cached_latents:
        if config.random_flip and not data.has_flip_variants:
            raise ValueError("random_flip needs flipped latents: prepare the data with random_flip=True.")
        rows = data.latent_rows[idx, flips.long()] if data.has_flip_variants else data.latent_rows[idx, 0]
        mean = data.latent_mean[rows].float()
        std = data.latent_std[rows].float() if data.latent_std is not None else None
    else:
        mean, std = encode_latent_distribution(data.vae, pixels)
    x0 = mean + std * torch.randn(mean.shape, generator=gen) if std is not None else mean
    cond, augmented = _conditioning(data, idx, drop, rwa, rwa_seed)
    noise = torch.randn(x0.shape, generator=gen)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn((n, x0.shape[1], 1, 1), generator=gen)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
    input_noise = noise
    if config.input_perturbation:  # drawn last, so runs without it draw exactly what they drew before
        input_noise = noise + config.input_perturbation * torch.randn(noise.shape, generator=gen)
    x0, noise, timesteps = x0.to(device), noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(x0, input_noise.to(device), timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type!r}.")
    return _Batch(noisy, timesteps, cond.to(device), target, augmented, noise)


def _batch_loss(model, batch: _Batch, noise_scheduler, config: FineTuneConfig,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """MSE (min-SNR weighted when snr_gamma; DREAM-corrected when dream_training) over the kept samples."""
    noisy, t, cond, target, noise = batch.noisy, batch.timesteps, batch.cond, batch.target, batch.noise
    if keep is not None:
        noisy, t, cond, target, noise = noisy[keep], t[keep], cond[keep], target[keep], noise[keep]
    if config.dream_training:
        from diffusers.training_utils import compute_dream_and_update_latents

        noisy, target = compute_dream_and_update_latents(model, noise_scheduler, t, noise, noisy, target, cond,
                                                         config.dream_detail_preservation)
    pred = model(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if config.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)
        weights = torch.clamp(snr, max=config.snr_gamma)
        weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        per_sample = per_sample * weights
    return per_sample.mean()


def train(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    data: TrainingData,
    config: FineTuneConfig,
    *,
    accelerator: Any = None,
    mask: Mask | None = None,
    adapter_name: str = "default",
    output_dir: str | None = None,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, int], None] | None = None,
    num_workers: int = 0,
) -> dict:
    """Inject the adapter of `config` into `unet` and train it on `data`; return the run's log (numbers only).

    `on_epoch_end(epoch, global_step)` is called after the optimizer step that completes each epoch (validation).
    `num_workers` threads decode and transform the next micro-batches' images while one trains (uncached latents).

    Only the adapter's tensors train (fp32 master copies; the frozen UNet is cast to the mixed-precision dtype).
    Checkpoints (`accelerator.save_state`: adapter, optimizer, scheduler, EMA, RNG and data position) go to
    `output_dir/checkpoint-<step>` every `checkpointing_steps`; `resume_from_checkpoint` ("latest" or a folder)
    continues one exactly. A NaN/inf loss raises FloatingPointError naming the step (checkpoints stay as they were).
    The final adapter is left in `unet` (EMA weights when `use_ema`); write it with `save_adapter`.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from .mitigation import RandomWordAugmentation, ThresholdMitigation

    started = time.time()
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if (checkpointing_steps or resume_from_checkpoint) and not output_dir:
        raise ValueError("Checkpointing and resuming need an output_dir.")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        if accelerator.is_main_process:  # temporary folders of a save that was killed mid-way
            for name in os.listdir(output_dir):
                if name.startswith(f".{CHECKPOINT_PREFIX}") and os.path.isdir(os.path.join(output_dir, name)):
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if getattr(unet, "peft_config", None) and adapter_name in unet.peft_config:
        raise ValueError(f"The UNet already holds an adapter named {adapter_name!r}; train a fresh copy of the base.")
    if (data.images is not None or data.latent_std is not None) and data.interpolation != config.image_interpolation_mode:
        raise ValueError(f"The data was prepared with interpolation {data.interpolation!r} but the config asks for "
                         f"{config.image_interpolation_mode!r}; pass interpolation=config.image_interpolation_mode to "
                         "prepare_training_data.")
    if config.mitigation == "rwa" and data.tokenizer is None:
        raise ValueError("RWA needs the tokenizer and text encoder in TrainingData (prepare_training_data sets them).")
    if config.mitigation == "rwa" and (data.captions is None or data.text_encoder is None):
        raise ValueError("RWA needs the raw captions and a text encoder in TrainingData.")

    # the training noise scheduler: DDPM with the model's schedule (the pipeline's may be an inference scheduler)
    noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)

    # adapter; trainable tensors in fp32, the frozen rest in the mixed-precision dtype (as diffusers does)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # LoRA's random init follows the config's seed, not the global RNG
        torch.manual_seed(config.seed)
        unet.add_adapter(config.adapter_config(mask), adapter_name=adapter_name)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    weight_dtype = _weight_dtype(accelerator)
    if weight_dtype != torch.float32:
        for p in unet.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    batch = min(config.train_batch_size, data.num_samples)
    batches_per_epoch = math.ceil(data.num_samples / (batch * num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps if config.max_train_steps is not None else \
        config.num_train_epochs * steps_per_epoch
    lr = config.learning_rate
    if config.scale_lr:
        lr = lr * config.gradient_accumulation_steps * config.train_batch_size * num_processes

    optimizer = lr_scheduler = None
    created: list[Any] = []
    if params:
        optimizer = _make_optimizer(params, config, lr)
        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=config.lr_warmup_steps * num_processes,
                                     num_training_steps=max(1, max_steps) * num_processes)
        model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        created += [model, optimizer, lr_scheduler]
    else:  # nothing trains (freeze, or an empty mask in strict scope): forward only
        model = unet.to(accelerator.device)
        accelerator._models.append(model)  # so checkpoints still carry the (empty) adapter and the position
        created.append(model)
    ema = None
    if config.use_ema and params:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(accelerator.device)
    mitigation = ThresholdMitigation(config.threshold, config.threshold_quantile) \
        if config.mitigation == "threshold" else None
    rwa = RandomWordAugmentation(data.tokenizer, num_words=config.rwa_num_words, p=config.rwa_prob) \
        if config.mitigation == "rwa" else None
    state = TrainState(mitigation)

    def save_hook(models, weights, folder):
        for i in reversed(range(len(models))):
            if accelerator.unwrap_model(models[i]) is unet:
                if accelerator.is_main_process:
                    save_adapter(unet, folder, adapter_name)
                if i < len(weights):
                    weights.pop(i)

    def load_hook(models, folder):
        for i in reversed(range(len(models))):
            if accelerator.unwrap_model(models[i]) is unet:
                _load_checkpoint_adapter(unet, folder, adapter_name)
                models.pop(i)

    handles = [accelerator.register_save_state_pre_hook(save_hook),
               accelerator.register_load_state_pre_hook(load_hook)]
    custom = [state] + ([ema] if ema is not None else [])
    accelerator.register_for_checkpointing(*custom)
    created += custom

    pixels: _Prefetcher | None = None
    try:
        resumed_from = resolve_checkpoint(output_dir, resume_from_checkpoint)
        if resumed_from is not None:
            accelerator.load_state(resumed_from)
            if ema is not None:
                ema.to(accelerator.device)
        accelerator.step = state.micro_step
        total_micro = max_steps * config.gradient_accumulation_steps
        bar = tqdm(total=max_steps, initial=state.global_step, desc=f"train {config.peft_method}",
                   disable=not progress or not accelerator.is_local_main_process)
        permutations: dict[int, torch.Tensor] = {}
        window_losses: list[float] = []
        window_has_grad = False
        uncond = data.uncond_embeds.to(accelerator.device)
        device = accelerator.device
        step_started = time.time()
        first_step = state.global_step
        epochs_done = state.micro_step // batches_per_epoch
        def indices(micro: int) -> torch.Tensor:
            epoch, k = divmod(micro, batches_per_epoch)
            if epoch not in permutations:
                permutations.clear()
                permutations[epoch] = torch.randperm(data.num_samples, generator=_generator(
                    config.seed, _STREAM_EPOCH, epoch))
            perm = permutations[epoch]
            if num_processes == 1:
                return perm[k * batch:(k + 1) * batch]
            # every process gets a full batch (the last one wraps around), as accelerate's even_batches
            return perm[(k * batch * num_processes + process_index * batch + torch.arange(batch)) % data.num_samples]

        def pixels_of(micro: int) -> torch.Tensor | None:
            return None if data.cached_latents else _pixels(data, config, indices(micro), micro, process_index)

        pixels = _Prefetcher(pixels_of, total_micro, num_workers if not data.cached_latents else 0)
        for micro in range(state.micro_step, total_micro):
            idx = indices(micro)
            gen = _generator(config.seed, _STREAM_STEP, micro, process_index)
            context = accelerator.accumulate(model) if optimizer is not None else contextlib.nullcontext()
            with context:
                b = _micro_batch(data, idx, config, noise_scheduler, gen, pixels.get(micro), rwa, device)
                state.augmented_captions += b.augmented
                keep = None
                skip = False
                if mitigation is not None:
                    with accelerator.autocast():
                        kept = mitigation.filter(accelerator.unwrap_model(model), b.noisy, b.timesteps, b.cond,
                                                 uncond)
                    total_kept = len(kept)
                    if num_processes > 1:
                        total_kept = int(accelerator.reduce(torch.tensor([len(kept)], device=device), "sum").item())
                    skip = total_kept == 0
                    keep = kept if len(kept) else torch.arange(len(idx), device=device)
                if skip:
                    state.skipped_micro_batches += 1
                else:
                    with accelerator.autocast():  # prepare() already autocasts a trained model; freeze is not prepared
                        loss = _batch_loss(model, b, noise_scheduler, config, keep)
                    if mitigation is not None and keep is not None and len(kept) == 0:
                        loss = loss * 0.0  # this process dropped everything but others did not (DDP sync)
                    check = accelerator.gather(loss.detach().reshape(1)) if num_processes > 1 else loss.detach()
                    if not torch.isfinite(check).all():
                        last = list_checkpoints(output_dir)[-1] if output_dir and list_checkpoints(output_dir) \
                            else None
                        raise FloatingPointError(
                            f"Loss is {loss.item()} at step {state.global_step + 1} (micro-batch {micro + 1}); "
                            f"training stopped and no adapter was written. Last good checkpoint: "
                            f"{last or 'none'}. Lower the learning rate or use fp32/bf16.")
                    window_losses.append(float(loss.detach().item()))
                    if loss.requires_grad:
                        accelerator.backward(loss)
                        window_has_grad = True
                sync = (micro + 1) % config.gradient_accumulation_steps == 0
                if sync and optimizer is not None:
                    if window_has_grad:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                    else:  # a skipped step: no update, but the schedule stays aligned with the step count
                        with warnings.catch_warnings():
                            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
                            lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            state.micro_step = micro + 1
            if not sync:
                continue
            state.global_step += 1
            if window_losses:
                state.losses.append(float(np.mean(window_losses)))
            else:
                state.skipped_steps += 1
            if ema is not None and window_has_grad:
                ema.step(params)
            logs = {"train_loss": state.losses[-1] if window_losses else float("nan")}
            if lr_scheduler is not None:
                logs["lr"] = lr_scheduler.get_last_lr()[0]
            if mitigation is not None:
                logs["dropped_fraction"] = mitigation.stats()["dropped_fraction"]
                logs["skipped_steps"] = state.skipped_steps
            if accelerator.trackers:
                accelerator.log(logs, step=state.global_step)
            window_losses, window_has_grad = [], False
            bar.update(1)
            if state.global_step % 20 == 0 and state.losses:
                bar.set_postfix(loss=f"{np.mean(state.losses[-20:]):.4f}")
            if checkpointing_steps and state.global_step % checkpointing_steps == 0:
                if accelerator.is_main_process:
                    _save_checkpoint(accelerator, output_dir, state.global_step, checkpoints_total_limit)
                accelerator.wait_for_everyone()
            if on_epoch_end is not None and state.micro_step // batches_per_epoch > epochs_done:
                epochs_done = state.micro_step // batches_per_epoch
                on_epoch_end(epochs_done, state.global_step)
        bar.close()
        steps_run = state.global_step - first_step
        train_time = time.time() - step_started
    finally:
        if pixels is not None:
            pixels.close()
        for h in handles:
            h.remove()
        _release(accelerator, created)
    if ema is not None:
        ema.copy_to(params)
    if optimizer is not None and weight_dtype != torch.float32:
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drop the autocast wrapper of prepare()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.eval()
    result = {
        "losses": list(state.losses),
        "loss_summary": summarize_losses(state.losses),
        "final_loss": float(np.mean(state.losses[-50:])) if state.losses else math.nan,
        "trainable_params": trainable_parameters(unet),
        "global_step": state.global_step,
        "max_train_steps": max_steps,
        "num_train_epochs": math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else 0,
        "steps_per_epoch": steps_per_epoch,
        "learning_rate": lr,
        "skipped_steps": state.skipped_steps,
        "skipped_micro_batches": state.skipped_micro_batches,
        "resumed_from": os.path.basename(resumed_from) if resumed_from else None,
        "train_time_s": round(train_time, 3),
        "steps_per_second": round(steps_run / train_time, 3) if train_time > 0 and steps_run else None,
        "wall_time_s": round(time.time() - started, 3),
        "latents": data.stats.get("latents", "cached"),
        "text": data.stats.get("text", "cached"),
    }
    if mitigation is not None:
        result["threshold"] = mitigation.stats()
    if rwa is not None:
        result["rwa_augmented_captions"] = state.augmented_captions
    return result


def _load_checkpoint_adapter(unet: torch.nn.Module, folder: str, adapter_name: str) -> None:
    """Load the adapter tensors of a checkpoint into the already injected adapter (same method and mask only)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = read_adapter_config(folder)
    current = unet.peft_config[adapter_name]
    if saved.method != current.method or saved.mask != current.mask or saved.mask_scope != current.mask_scope:
        raise ValueError(f"Checkpoint {folder!r} was trained with method {saved.method!r} and another mask or scope; "
                         "resume with the same --peft_method, --mask and --mask_scope.")
    result = set_peft_model_state_dict(unet, load_file(os.path.join(folder, "adapter_model.safetensors")),
                                       adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"Checkpoint {folder!r} does not fit this UNet: unexpected keys {result.unexpected_keys[:3]}.")


def fine_tune(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    config: FineTuneConfig,
    accelerator: Any = None,
    mask: Mask | None = None,
    progress: bool = True,
) -> dict:
    """Inject the adapter of `config` into `unet` and train it on fixed latents/embeddings; return a loss log.

    `prompt_embeds[i]` is the embedding of the caption of `latents[i]`; `uncond_embeds` is the embedding of "".
    (Kept for callers holding tensors; `prepare_training_data` + `train` is the full path.)
    """
    data = training_data_from_tensors(latents, prompt_embeds, uncond_embeds)
    return train(unet, noise_scheduler, data, config, accelerator=accelerator, mask=mask, progress=progress)


@torch.no_grad()
def fixed_batch_loss(unet: torch.nn.Module, noise_scheduler: Any, data: TrainingData, num_samples: int = 8, seed: int = 0,
                     prediction_type: str | None = None) -> float:
    """Denoising loss on a fixed batch (first samples, latent means, fixed noise and timesteps): for before/after."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    idx = torch.arange(min(num_samples, data.num_samples))
    gen = _generator(seed, _STREAM_EVAL)
    device = next(unet.parameters()).device
    if data.cached_latents:
        x0 = data.latent_mean[data.latent_rows[idx, 0]].float()
    else:
        pixels = torch.stack([transform_image(data.images(int(i)), data.resolution, True,
                                              interpolation=data.interpolation) for i in idx])
        x0 = encode_latent_distribution(data.vae, pixels)[0]
    if data.cached_text:
        cond = data.prompt_embeds[data.caption_rows[idx]].float()
    else:
        cond = encode_prompts(data.tokenizer, data.text_encoder, [data.captions[int(i)] for i in idx])
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    x0, noise, t, cond = x0.to(device), noise.to(device), t.to(device), cond.to(device)
    noisy = scheduler.add_noise(x0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    was_training = unet.training
    unet.eval()
    pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
    unet.train(was_training)
    return float(F.mse_loss(pred.float(), target.float()).item())


# --------------------------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def merged_adapters(unet: torch.nn.Module):
    """Fold the adapters into the UNet's weights while sampling (no adapter overhead per step), then restore them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    for layer in layers:
        layer.merge()
    try:
        yield unet
    finally:
        for layer in layers:
            layer.unmerge()


def generate_validation_grid(pipe: Any, prompts: Sequence[str], num_images_per_prompt: int = 4, seed: int = 0,
                             num_inference_steps: int = 20, guidance_scale: float = 4.0, output_path: str | None = None,
                             progress: bool = True) -> Any:
    """Generate `num_images_per_prompt` images per prompt (seeded) and return them as one grid (rows = prompts).

    Written atomically to `output_path` (PNG) when given. Runs under autocast when the UNet's frozen weights are
    half precision.
    """
    from diffusers.utils import make_image_grid

    device = pipe.unet.device
    dtype = next((p.dtype for p in pipe.unet.parameters() if not p.requires_grad), torch.float32)
    pipe.set_progress_bar_config(disable=not progress)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        images = pipe(list(prompts), num_images_per_prompt=num_images_per_prompt,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pil").images
    grid = make_image_grid(images, rows=len(prompts), cols=num_images_per_prompt)
    if output_path is not None:
        with atomic_path(output_path, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
    return grid
