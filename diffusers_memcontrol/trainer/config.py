"""The hyper-parameters of one MemControl fine-tune (FineTuneConfig); the trainer's flags are generated from them."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data.images import INTERPOLATIONS, check_interpolation
from ..tuners import LAYOUTS, SCOPES, MemControlConfig
from ..tuners import METHODS as PEFT_METHODS
from .mitigation import MITIGATIONS

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DEFAULT_LR = {"svdiff": 1e-3, "difffit": 1e-3, "lora": 1e-4, "attention": 1e-5, "full": 1e-5, "freeze": 1e-3}


def parse_learning_rates(text: str) -> dict[str, float]:
    """`"svdiff=3e-2,attention=3e-3"` -> {method: learning rate} (PEFT methods usually train with larger rates)."""
    rates = {}
    for item in (i.strip() for i in text.split(",")):
        method, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if method.strip() not in PEFT_METHODS or not (rate > 0 and math.isfinite(rate)):
            raise argparse.ArgumentTypeError(f"{item!r}: expected METHOD=RATE with METHOD one of "
                                             f"{', '.join(PEFT_METHODS)} and RATE a positive number, e.g. "
                                             "svdiff=3e-2,full=1e-3")
        rates[method.strip()] = rate
    return rates


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

    def adapter_config(self) -> MemControlConfig:
        """The peft config of this fine-tune."""
        return MemControlConfig(method=self.peft_method, mask=self.mask, mask_layout=self.mask_layout,
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


def add_config_arguments(group: Any, names: tuple[str, ...]) -> None:
    """Add the FineTuneConfig fields `names` as flags: type, default, choices and help come from the field.

    --learning_rate and --max_train_steps default to None: the learning rate then depends on --peft_method, and the
    field's step count applies when --num_train_epochs is not given either.
    """
    by_name = {f.name: f for f in fields(FineTuneConfig)}
    for name in names:
        f = by_name[name]
        help_text = f.metadata["help"]
        if f.type == "bool":
            group.add_argument(f"--{name}", action="store_true", help=help_text)
            continue
        default = f.default
        if name == "learning_rate":
            default = None
            help_text += (" Default: the method's rate in --learning_rates, else " +
                          ", ".join(f"{lr:g} for {m}" for m, lr in DEFAULT_LR.items()) + ".")
            group.add_argument("--learning_rates", type=parse_learning_rates, default={}, metavar="METHOD=LR,...",
                               help="Per-method learning rates (e.g. svdiff=3e-2,attention=3e-3,full=1e-3), used when "
                                    "--learning_rate is not given: every row of a search or a table trains its method "
                                    "at its own rate.")
        elif name == "max_train_steps":
            default = None
            help_text += f" Default when --num_train_epochs is not given either: {f.default}."
        kind = None if "str" in f.type else int if f.type.startswith("int") else float
        group.add_argument(f"--{name}", type=kind, default=default, choices=f.metadata.get("choices"),
                           help=help_text)
