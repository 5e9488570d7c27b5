"""Resumable checkpoints: the run's position (TrainState) and the checkpoint-<step> folders of accelerate's state."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import torch

from .adapters import read_adapter_config
from .files import usual_mode

CHECKPOINT_PREFIX = "checkpoint-"


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


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
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



def load_checkpoint_adapter(unet: torch.nn.Module, folder: str, adapter_name: str) -> None:
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
