"""Purpose-built memorization mitigations that MemControl is compared with and can be combined with.

* :class:`RandomWordAugmentation` (RWA) -- insert random vocabulary tokens into captions
  (Somepalli et al., NeurIPS 2023; the MemControl authors' code uses it as a baseline).
* :func:`threshold_mask` / :class:`ThresholdMitigation` -- Wen et al. (ICLR 2024) training-time
  mitigation: drop the samples of a batch whose text-conditional noise-prediction norm is high.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffusers_memcontrol.metrics.memorization import _conditional_delta_norms

__all__ = ["MITIGATIONS", "RandomWordAugmentation", "ThresholdMitigation", "threshold_mask"]

MITIGATIONS = ("none", "rwa", "threshold")

RngLike = np.random.Generator | random.Random | int | None


# ----------------------------------------------------------------------------------------------
# Random word augmentation
# ----------------------------------------------------------------------------------------------


def _as_rng(rng: RngLike) -> np.random.Generator | random.Random:
    """Accept a numpy Generator, a random.Random, an int seed or None (fresh, unseeded)."""
    if isinstance(rng, (np.random.Generator, random.Random)):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(None if rng is None else int(rng))
    raise ValueError(
        f"rng must be a numpy Generator, random.Random, an int seed or None, got {type(rng).__name__}"
    )


def _uniform(rng: np.random.Generator | random.Random) -> float:
    """A float in [0, 1) from either kind of RNG."""
    return float(rng.random())


def _randbelow(rng: np.random.Generator | random.Random, n: int) -> int:
    """An int in [0, n) from either kind of RNG."""
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    return int(rng.integers(0, n))


@dataclass
class RandomWordAugmentation:
    """Random word augmentation (RWA) of captions, usable at training and at inference.

    With probability ``p`` a caption gets ``num_words`` random vocabulary tokens, each decoded by
    the tokenizer and inserted at a random word position (whitespace-separated words; a position
    may be before the first or after the last word). Token ids are drawn uniformly below
    ``max_token_id`` (default: the tokenizer's size), excluding special tokens and tokens that
    decode to empty or multi-word text, so every insertion adds exactly one word.

    Defaults follow the MemControl authors' code (always insert 4 tokens; their SD tokenizer cap is
    id < 49400, pass ``max_token_id=49400`` to match it exactly). Somepalli et al. (NeurIPS 2023)
    use ``p=0.1, num_words=2`` at training time.
    """

    tokenizer: Any = field(repr=False, metadata={"help": "tokenizer with __len__, decode and special ids"})
    num_words: int = field(default=4, metadata={"help": "tokens inserted per augmented caption (ref. code: 4)"})
    p: float = field(default=1.0, metadata={"help": "probability a caption is augmented (ref. code: 1; DCR: 0.1)"})
    max_token_id: int | None = field(
        default=None, metadata={"help": "draw ids below this (ref. code: 49400 for SD); None = vocab size"}
    )
    _candidates: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_words, int) or isinstance(self.num_words, bool) or self.num_words < 0:
            raise ValueError(f"num_words must be a non-negative int, got {self.num_words!r}")
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {self.p!r}")
        vocab_size = len(self.tokenizer)
        limit = vocab_size if self.max_token_id is None else int(self.max_token_id)
        if limit < 1 or limit > vocab_size:
            raise ValueError(f"max_token_id must be in [1, {vocab_size}] (the tokenizer's size), got {limit}")
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        candidates = np.array([i for i in range(limit) if i not in special], dtype=np.int64)
        if candidates.size == 0:
            raise ValueError("the tokenizer has no non-special token below max_token_id to insert")
        self._candidates = candidates

    def random_word(self, rng: RngLike = None) -> str:
        """One random vocabulary token decoded to a single whitespace-free word."""
        rng = _as_rng(rng)
        for _ in range(1000):
            token_id = int(self._candidates[_randbelow(rng, len(self._candidates))])
            word = self.tokenizer.decode([token_id]).strip()
            if word and len(word.split()) == 1:
                return word
        raise RuntimeError("could not draw a token that decodes to a single word after 1000 tries")

    def __call__(self, caption: str, rng: RngLike = None) -> str:
        """Return the caption, augmented with probability ``p`` (seeded by ``rng``)."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        rng = _as_rng(rng)
        if self.num_words == 0 or self.p == 0.0 or (self.p < 1.0 and _uniform(rng) >= self.p):
            return caption
        words = caption.split()
        for _ in range(self.num_words):
            position = _randbelow(rng, len(words) + 1)
            words.insert(position, self.random_word(rng))
        return " ".join(words)

    def apply_batch(self, captions: Sequence[str], rng: RngLike = None) -> list[str]:
        """Augment a batch of captions independently, drawing from one RNG in order."""
        if isinstance(captions, str):
            raise TypeError("apply_batch expects a sequence of captions, got a single str")
        rng = _as_rng(rng)
        return [self(c, rng) for c in captions]


# ----------------------------------------------------------------------------------------------
# Threshold mitigation (Wen et al.)
# ----------------------------------------------------------------------------------------------


def _check_threshold(threshold: float | str, quantile: float) -> None:
    """Validate a threshold (positive number or "auto") and a quantile in (0, 1]."""
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f'threshold must be a positive number or "auto", got {threshold!r}')
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f'threshold must be a positive number or "auto", got {threshold!r}')
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")


def threshold_mask(
    unet: Any,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    threshold: float | str = 2.0,
    quantile: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wen et al. training-time mitigation: which samples of a batch to keep in the loss.

    Computes, without grad, each sample's L2 norm of ``eps(x_t, t, prompt) - eps(x_t, t, uncond)``
    (one batched forward). With a number, samples whose norm is at or above ``threshold`` are
    dropped (Wen et al.'s README uses 2). With ``"auto"`` (MemControl authors' code), samples above
    the batch's ``quantile`` (default 0.9, i.e. the top 10%) are dropped.

    Returns ``(keep_mask BoolTensor[B], norms FloatTensor[B])`` on the latents' device.
    """
    _check_threshold(threshold, quantile)
    if not torch.is_tensor(noisy_latents) or noisy_latents.dim() < 2 or noisy_latents.shape[0] == 0:
        raise ValueError("noisy_latents must be a non-empty batched tensor [B, C, H, W]")
    norms = _conditional_delta_norms(unet, noisy_latents, timesteps, prompt_embeds, uncond_embeds)
    norms = norms.to(noisy_latents.device)
    if threshold == "auto":
        cut = torch.quantile(norms, float(quantile))
        keep = norms <= cut
    else:
        keep = norms < float(threshold)
    return keep, norms


@dataclass
class ThresholdMitigation:
    """Threshold mitigation config plus counters, for a training loop that drops high-norm samples.

    ``filter(...)`` returns the indices of the samples to keep (empty: skip the optimizer step) and
    updates ``steps``, ``skipped_steps``, ``seen_samples`` and ``dropped_samples``.
    """

    threshold: float | str = field(default=2.0, metadata={"help": 'hard threshold (Wen et al.: 2) or "auto"'})
    quantile: float = field(default=0.9, metadata={"help": 'batch quantile used by "auto" (ref. code: 0.9)'})
    steps: int = field(default=0, metadata={"help": "batches filtered so far"})
    skipped_steps: int = field(default=0, metadata={"help": "batches where nothing remained"})
    seen_samples: int = field(default=0, metadata={"help": "samples filtered so far"})
    dropped_samples: int = field(default=0, metadata={"help": "samples dropped so far"})
    last_norms: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_threshold(self.threshold, self.quantile)

    def filter(
        self,
        unet: Any,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        uncond_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Indices (LongTensor) of the samples to keep; updates the counters."""
        keep, norms = threshold_mask(
            unet, noisy_latents, timesteps, prompt_embeds, uncond_embeds, self.threshold, self.quantile
        )
        kept = torch.nonzero(keep, as_tuple=False).reshape(-1)
        self.record(keep)
        self.last_norms = norms.detach()
        return kept

    def record(self, keep_mask: torch.Tensor) -> None:
        """Update the counters from a keep mask (for loops that call :func:`threshold_mask` themselves)."""
        batch = int(keep_mask.numel())
        kept = int(keep_mask.sum())
        self.steps += 1
        self.seen_samples += batch
        self.dropped_samples += batch - kept
        if kept == 0:
            self.skipped_steps += 1

    def stats(self) -> dict[str, float]:
        """Counters and the dropped fraction, for logging."""
        frac = self.dropped_samples / self.seen_samples if self.seen_samples else 0.0
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "seen_samples": self.seen_samples,
            "dropped_samples": self.dropped_samples,
            "dropped_fraction": frac,
        }

    def reset(self) -> None:
        """Zero the counters."""
        self.steps = self.skipped_steps = self.seen_samples = self.dropped_samples = 0
        self.last_norms = None
