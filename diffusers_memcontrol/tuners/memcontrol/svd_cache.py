"""The SVD of a frozen base weight, computed once per machine: cached on disk, content-addressed by the weight.

Every SV-DIFF injection (each search trial, each `load_memcontrol_adapter`) needs the SVD of every adapted weight; on
SD1.5 that is minutes on a GPU and tens of minutes on a CPU. The cache key is the SHA-256 of the weight's shape, dtype
and bytes, so any model holding the same weight (whatever its name or path) reuses the same factors. Files live in
`<cache root>/svd/v1/<key[:2]>/<key>.safetensors` (the root is `$MEMCONTROL_CACHE_DIR` or the user cache folder) and
are written atomically; a missing, unreadable or unwritable cache only costs the SVD. Cached factors are used only
after `check_factors` finds them an SVD of this very weight (shapes, dtype, finite values, orthonormal U and Vh,
non-negative sorted S, and U diag(S) Vh reproducing the weight on random probes); a file that fails is recomputed.
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


def check_factors(weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                  probes: int = 4, tol: float = 1e-3) -> str | None:
    """Why (u, s, vh) is not a thin SVD of `weight` flattened to out x rest, or None when it is (checked on random
    probe vectors: O((out + in) * r) per probe, not a decomposition)."""
    matrix = weight.detach().reshape(weight.shape[0], -1).float()
    out, fan_in = matrix.shape
    rank = min(out, fan_in)
    if tuple(u.shape) != (out, rank) or tuple(s.shape) != (rank,) or tuple(vh.shape) != (rank, fan_in):
        return f"shapes {tuple(u.shape)}, {tuple(s.shape)}, {tuple(vh.shape)} do not fit a {out}x{fan_in} weight"
    if any(t.dtype != torch.float32 for t in (u, s, vh)):
        return "factors are not float32"
    if not all(torch.isfinite(t).all() for t in (u, s, vh)):
        return "factors hold NaN or infinite values"
    if (s < 0).any() or (s[1:] > s[:-1] * (1 + tol) + tol).any():
        return "singular values are not non-negative and sorted"
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(fan_in, probes, generator=generator).to(matrix.device)
    y = torch.randn(rank, probes, generator=generator).to(matrix.device)
    u, s, vh = u.to(matrix.device), s.to(matrix.device), vh.to(matrix.device)
    scale = float(s[0]) if rank else 0.0
    if (matrix @ x - u @ (s[:, None] * (vh @ x))).norm() > tol * max(scale, 1e-12) * x.norm():
        return "factors do not reproduce the weight"
    for basis in (u, vh.T):
        if (basis.T @ (basis @ y) - y).norm() > tol * y.norm():
            return "U or Vh is not orthonormal"
    return None


def layer_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `weight` on its device, read from the on-disk cache when this weight was decomposed before."""
    if weight.device.type == "meta":
        return compute_svd(weight)
    path = svd_cache_path(weight_key(weight))
    if os.path.exists(path):
        try:
            factors = load_file(path, device=str(weight.device))
            u, s, vh = factors["u"], factors["s"], factors["vh"]
            problem = check_factors(weight, u, s, vh)
            if problem is None:
                return u, s, vh
            warnings.warn(f"Ignoring the SVD cache file {path}: {problem}; recomputing it.", stacklevel=2)
        except (OSError, SafetensorError, KeyError) as error:
            warnings.warn(f"Ignoring an unreadable SVD cache file {path}: {error}", stacklevel=2)
    u, s, vh = compute_svd(weight)
    try:
        with atomic_path(path) as tmp:
            save_file({"u": u, "s": s, "vh": vh}, tmp)
    except OSError as error:
        warnings.warn(f"Could not write the SVD cache {path}: {error}", stacklevel=2)
    return u, s, vh
