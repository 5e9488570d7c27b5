"""Resumable checkpoints: the run's position (TrainState) and the `checkpoint-<step>` folders that hold the whole state.

A checkpoint holds only files this package writes and reads without unpickling: the adapter (peft format), and each
state part (optimizer, LR schedule, EMA, gradient scaler, RNG states, TrainState) as `<part>.json` (the structure and
plain values) plus `<part>.safetensors` (its tensors). `manifest.json` (file -> SHA-256) is written last, inside a
temporary folder that is renamed to `checkpoint-<step>` only when complete; old checkpoints are rotated out only after
that. Before anything is loaded, the manifest and every digest are checked: a checkpoint without a manifest, with a
missing, extra or changed file, is refused (`--resume_from_checkpoint latest` skips it for the newest valid one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from ..errors import InputError
from ..files import discard_folder, file_digest, folder_bytes, replace_folder, reporting_full_disk, usual_mode

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "diffusers-memcontrol-checkpoint/1"


class CheckpointError(InputError):
    """A checkpoint folder that is incomplete, changed after it was written, or not written by this package."""


class TrainState:
    """Position and counters of a run (checkpointed as JSON, so a resumed run continues exactly)."""

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


# ----------------------------------------------------------------------------------------------------------------
# state parts: nested Python state <-> JSON + safetensors (no pickle)
# ----------------------------------------------------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `value`; its tensors go to `tensors` under generated keys."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"Cannot checkpoint a value of type {type(value).__name__} without pickle.")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_state_part(folder: str, name: str, state: Any) -> None:
    """Write `state` (nested dicts/lists/tuples of tensors, arrays and plain values) as `<name>.json` and
    `<name>.safetensors` in `folder`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors)
    save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(skeleton, f, allow_nan=False)


def read_verified(folder: str, name: str, manifest: dict) -> bytes:
    """The bytes of `folder/name`, checked against the manifest's digest (read once: what is checked is what is used)."""
    expected = manifest["files"].get(name)
    if expected is None:
        raise CheckpointError(f"Checkpoint {folder!r}: {name} is not listed in its {MANIFEST_FILE}.")
    try:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
    except OSError as error:
        raise CheckpointError(f"Checkpoint {folder!r}: cannot read {name}: {error}") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"Checkpoint {folder!r}: {name} does not match its digest in {MANIFEST_FILE}.")
    return data


def read_state_part(folder: str, name: str, manifest: dict) -> Any:
    """Inverse of `write_state_part`, reading only files whose digests match `manifest`."""
    from safetensors.torch import load

    try:
        skeleton = json.loads(read_verified(folder, f"{name}.json", manifest))
        tensors = load(read_verified(folder, f"{name}.safetensors", manifest))
        return _decode(skeleton, tensors)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a verified but unreadable part: still a bad checkpoint
        raise CheckpointError(f"Checkpoint {folder!r}: {name} cannot be read: {error}") from None


def has_state_part(manifest: dict, name: str) -> bool:
    """Whether the checkpoint holds the state part `name`."""
    return f"{name}.json" in manifest["files"]


# ----------------------------------------------------------------------------------------------------------------
# folders, manifest, rotation
# ----------------------------------------------------------------------------------------------------------------
def _step_of(name: str) -> int | None:
    m = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders of `output_dir`, oldest first (complete or not: see `verify_checkpoint`)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = [(step, n) for n in os.listdir(output_dir)
             if (step := _step_of(n)) is not None and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def verify_checkpoint(folder: str) -> dict:
    """The manifest of `folder` once every file it lists matches its digest and no other file is there.

    Raises CheckpointError for a missing or unreadable manifest, a missing, changed or unlisted file.
    """
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {folder!r} has no {MANIFEST_FILE}: its save was interrupted, or it was not "
                              "written by this version of diffusers-memcontrol; refusing to load it.")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Checkpoint {folder!r}: unreadable {MANIFEST_FILE} ({error}); refusing to load it.") \
            from None
    present = set(_checkpoint_files(folder))
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        raise CheckpointError(f"Checkpoint {folder!r} does not match its {MANIFEST_FILE} (missing: {missing[:3]}, "
                              f"not listed: {extra[:3]}); refusing to load it.")
    for name, digest in files.items():
        if not os.path.isfile(os.path.join(folder, name)) or file_digest(os.path.join(folder, name)) != digest:
            raise CheckpointError(f"Checkpoint {folder!r}: {name} does not match its digest in {MANIFEST_FILE}; "
                                  "refusing to load it.")
    return manifest


def resolve_checkpoint(output_dir: str | None, spec: str | None) -> str | None:
    """`--resume_from_checkpoint` value -> a verified folder: "latest" (the newest complete one; None when there is
    none yet), a path, or a name inside `output_dir`. A named checkpoint that fails `verify_checkpoint` is refused."""
    if not spec:
        return None
    if spec == "latest":
        for folder in reversed(list_checkpoints(output_dir) if output_dir else []):
            try:
                verify_checkpoint(folder)
            except CheckpointError as error:
                logger.warning("Skipping checkpoint %s: %s", os.path.basename(folder), error)
                continue
            return folder
        return None
    for candidate in (spec, os.path.join(output_dir or "", spec)):
        if os.path.isdir(candidate):
            verify_checkpoint(candidate)
            return candidate
    raise FileNotFoundError(f"Checkpoint {spec!r} not found (looked for it as a path and inside {output_dir!r}).")


def _checkpoint_files(folder: str) -> list[str]:
    """Every entry under `folder` but the manifest and the folders holding files, as "/"-joined relative names,
    sorted (plain files, e.g. a full fine-tune's `unet/config.json`; a link or an empty folder is listed too, so
    that it fails the manifest check)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.listdir(path):
                names.append(os.path.relpath(path, folder).replace(os.sep, "/"))
        names += [os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/") for n in filenames]
    return sorted(n for n in names if n != MANIFEST_FILE)


def _fsync_folder(folder: str) -> None:
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(output_dir: str, step: int, total_limit: int | None, write_state: Callable[[str], None],
                    needed: int | None = None) -> str:
    """Write `checkpoint-<step>`: `write_state(folder)` fills a temporary folder, the manifest is written last, the
    folder is renamed into place, and only then are the oldest checkpoints beyond `total_limit` removed.

    Out of disk space, the temporary folder is removed and a `files.DiskFullError` names `output_dir`, the bytes
    `needed` (default: the size of the newest checkpoint) and the bytes free; the earlier checkpoints stay whole."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    newest = list_checkpoints(output_dir)[-1:]
    with reporting_full_disk(output_dir, needed if needed is not None else lambda: sum(map(folder_bytes, newest))):
        tmp = tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}-", dir=output_dir)
        try:
            write_state(tmp)
            names = _checkpoint_files(tmp)
            if os.path.exists(os.path.join(tmp, MANIFEST_FILE)) or not all(
                    os.path.isfile(os.path.join(tmp, n)) and not os.path.islink(os.path.join(tmp, n)) for n in names):
                raise RuntimeError(f"A checkpoint holds plain files (and folders of them) only, not {names}.")
            manifest = {"format": MANIFEST_FORMAT, "step": step,
                        "files": {n: file_digest(os.path.join(tmp, n)) for n in names}}
            with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
            for dirpath, dirnames, filenames in os.walk(tmp):
                for name in dirnames + filenames:
                    usual_mode(os.path.join(dirpath, name))
            usual_mode(tmp)
            _fsync_folder(tmp)
            replace_folder(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if total_limit is not None and total_limit > 0:
        older = [c for c in list_checkpoints(output_dir) if c != final]
        for old in older[:max(0, len(older) + 1 - total_limit)]:
            discard_folder(old)
    return final


def load_checkpoint_adapter(unet: torch.nn.Module, folder: str, adapter_name: str, manifest: dict) -> None:
    """Load the adapter tensors of a verified checkpoint into the already injected adapter (same method and mask
    only); every tensor is checked (keys, shapes, dtype, finite) before the UNet is touched."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load

    from ..files import to_jsonable
    from ..hub.adapters import check_adapter_tensors

    try:
        saved = json.loads(read_verified(folder, ADAPTER_CONFIG_FILE, manifest))
        state = load(read_verified(folder, ADAPTER_WEIGHTS_FILE, manifest))
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - verified bytes that do not parse: still a bad checkpoint
        raise CheckpointError(f"Checkpoint {folder!r}: its adapter cannot be read: {error}") from None
    current = unet.peft_config[adapter_name]
    mine = json.loads(json.dumps(to_jsonable({"method": current.method, "mask": current.mask,
                                              "mask_scope": current.mask_scope})))
    if any(saved.get(k) != v for k, v in mine.items()):
        raise ValueError(f"Checkpoint {folder!r} was trained with method {saved.get('method')!r} and another mask or "
                         "scope; resume with the same --peft_method, --mask and --mask_scope.")
    expected = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    check_adapter_tensors(state, {k: (tuple(v.shape), v.dtype) for k, v in expected.items()}, repr(folder),
                          error=CheckpointError, strict_dtype=True)
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
