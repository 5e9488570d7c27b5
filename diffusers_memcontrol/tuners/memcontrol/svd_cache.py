"""The SVD of a frozen base weight, computed once per machine: cached on disk, content-addressed by the weight.

Every SV-DIFF injection (each search trial, each `load_memcontrol_adapter`) needs the SVD of every adapted weight; on
SD1.5 that is minutes on a GPU and tens of minutes on a CPU. The cache key is the SHA-256 of the weight's shape, dtype
and bytes, so any model holding the same weight (whatever its name or path) reuses the same factors. Files live in
`<cache root>/svd/v1/<key[:2]>/<key>.safetensors` (the root is `$MEMCONTROL_CACHE_DIR` or the user cache folder) and
are written atomically; a missing, unreadable or unwritable cache only costs the SVD.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...cache import default_cache_dir
from ...files import atomic_path

SVD_CACHE_VERSION = "v1"


def weight_key(weight: torch.Tensor) -> str:
    """SHA-256 over the shape, dtype and bytes of one tensor (the cache key of its SVD)."""
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    flat = weight.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def svd_cache_path(key: str) -> str:
    """Where the SVD of the weight with content key `key` is stored."""
    return os.path.join(default_cache_dir(), "svd", SVD_CACHE_VERSION, key[:2], f"{key}.safetensors")


def compute_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh (fp32, thin) of `weight` flattened to out x rest."""
    threads = torch.get_num_threads()
    if weight.device.type == "cpu":
        torch.set_num_threads(1)  # per-layer SVDs are small: threading them only costs (up to ~20x on a busy machine)
    try:
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().reshape(weight.shape[0], -1).float(), full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    return u.contiguous(), s.contiguous(), vh.contiguous()


def layer_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `weight` on its device, read from the on-disk cache when this weight was decomposed before."""
    if weight.device.type == "meta":
        return compute_svd(weight)
    path = svd_cache_path(weight_key(weight))
    if os.path.exists(path):
        try:
            factors = load_file(path, device=str(weight.device))
            return factors["u"], factors["s"], factors["vh"]
        except (OSError, SafetensorError, KeyError) as error:
            warnings.warn(f"Ignoring an unreadable SVD cache file {path}: {error}", stacklevel=2)
    u, s, vh = compute_svd(weight)
    try:
        with atomic_path(path) as tmp:
            save_file({"u": u, "s": s, "vh": vh}, tmp)
    except OSError as error:
        warnings.warn(f"Could not write the SVD cache {path}: {error}", stacklevel=2)
    return u, s, vh
