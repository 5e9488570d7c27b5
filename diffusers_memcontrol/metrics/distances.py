"""Distances used to measure memorization: AMD (eq. 5), Carlini et al.'s tiled l2, cliques, extraction.

Everything quadratic is chunked so that its memory is bounded by the chunk sizes, not by the inputs:

- :func:`average_min_cosine_distance` (AMD, eq. 5 of the MemControl paper) and
  :func:`replication_scores` (Somepalli et al., NeurIPS 2023) walk generated x training features in
  ``chunk_size x train_chunk_size`` blocks with a running minimum.
- :func:`tiled_l2` is the "modified l2" of Carlini et al. (USENIX Security 2023): the maximum over
  ``grid x grid`` non-overlapping tiles of the l2 distance between corresponding tiles.
- :func:`find_cliques` enumerates true maximal cliques (networkx, after k-core pruning), not connected
  components.
- :func:`extraction_attack` combines the two into Carlini et al.'s generate-and-filter attack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "DEFAULT_EXTRACTION_THRESHOLD",
    "ExtractionResult",
    "average_min_cosine_distance",
    "clique_share",
    "extraction_attack",
    "find_cliques",
    "min_cosine_distances",
    "nearest_neighbors",
    "replication_scores",
    "tiled_l2",
]

# Default extraction threshold on the "rms" scale (per-tile l2 / sqrt(tile dims), images in [0, 1]).
# See ``extraction_attack`` for what it is based on.
DEFAULT_EXTRACTION_THRESHOLD = 0.15


# ----------------------------------------------------------------------------------------------
# feature validation helpers
# ----------------------------------------------------------------------------------------------


def _as_2d_array(x: Any, name: str) -> ArrayLike:
    """Return ``x`` as a 2-D numpy array or torch tensor without copying it; raise ValueError otherwise."""
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        try:
            x = np.asarray(x)
        except Exception as err:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} must be a 2-D array [rows, dims]; could not convert {type(x)!r}") from err
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dims]; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one row, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions: expected shape [rows, dims>0], got {tuple(x.shape)}")
    if isinstance(x, np.ndarray) and not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers; got dtype {x.dtype}")
    if isinstance(x, torch.Tensor) and (x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must hold real numbers; got dtype {x.dtype}")
    return x


def _rows(x: ArrayLike, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` as a fresh ``dtype`` tensor on ``device`` (copies only that chunk)."""
    chunk = x[start:stop]
    if isinstance(chunk, np.ndarray):
        return torch.tensor(chunk, dtype=dtype, device=device)
    return chunk.detach().to(device=device, dtype=dtype)


def _normalized_rows(
    x: ArrayLike, start: int, stop: int, dtype: torch.dtype, device: torch.device, name: str, check: bool
) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` scaled to unit l2 norm; with ``check``, reject NaN/inf and zero rows."""
    t = _rows(x, start, stop, dtype, device)
    if check and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0]) + start
        raise ValueError(f"{name} contains NaN or inf (first at row {bad}); expected finite features")
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if check and bool((norms == 0).any()):
        bad = int((norms[:, 0] == 0).nonzero()[0, 0]) + start
        raise ValueError(
            f"{name} row {bad} has zero norm: cosine distance is undefined; expected non-zero feature vectors"
        )
    return t / norms


def _check_pair(gen_feats: Any, train_feats: Any) -> tuple[ArrayLike, ArrayLike]:
    """Validate both feature sets (2-D, non-empty, same dims) and return them unconverted."""
    gen = _as_2d_array(gen_feats, "gen_feats")
    train = _as_2d_array(train_feats, "train_feats")
    if gen.shape[1] != train.shape[1]:
        raise ValueError(
            f"feature dimensions differ: gen_feats has {gen.shape[1]} dims, train_feats has {train.shape[1]}; "
            "expected both from the same encoder"
        )
    return gen, train


def _check_chunk(value: int, name: str) -> int:
    """Return a positive integer chunk size or raise ValueError."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# nearest neighbours under cosine distance (AMD, replication)
# ----------------------------------------------------------------------------------------------


def nearest_neighbors(
    gen_feats: ArrayLike,
    train_feats: ArrayLike,
    *,
    chunk_size: int = 4096,
    train_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min cosine distance and nearest training index per generated row, in bounded memory, for reporting.

    Both axes are chunked: memory is ``O(chunk_size * train_chunk_size + (chunk_size + train_chunk_size) * D)``
    whatever ``N`` and ``M``, so 100k x 1M comparisons run in a few hundred MB. Rows are normalized once per
    block, similarities come from one matmul per block, and a running maximum keeps the best match.

    Args:
        gen_feats: ``[N, D]`` generated-image features (numpy or torch).
        train_feats: ``[M, D]`` training-image features (numpy or torch; only chunks are ever copied).
        chunk_size: generated rows per block.
        train_chunk_size: training rows per block.
        dtype: compute dtype, ``torch.float32`` (default) or ``torch.float64``.
        device: where to compute; default: the device of ``gen_feats`` if it is a tensor, else CPU.

    Returns:
        ``(distances, indices)``: ``distances[i] = min_j 1 - cos(gen_i, train_j)`` (in ``[0, 2]``, ``dtype``)
        and ``indices[i]`` = the ``j`` attaining it (int64; the first one on ties).
    """
    gen, train = _check_pair(gen_feats, train_feats)
    chunk_size = _check_chunk(chunk_size, "chunk_size")
    train_chunk_size = _check_chunk(train_chunk_size, "train_chunk_size")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if device is None:
        device = gen.device if isinstance(gen, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)

    n, m = gen.shape[0], train.shape[0]
    best_sim = torch.empty(n, dtype=dtype, device=device)
    best_idx = torch.empty(n, dtype=torch.long, device=device)
    with torch.no_grad():
        for g0 in range(0, n, chunk_size):
            g1 = min(g0 + chunk_size, n)
            g = _normalized_rows(gen, g0, g1, dtype, device, "gen_feats", check=True)
            run_sim = torch.full((g1 - g0,), -math.inf, dtype=dtype, device=device)
            run_idx = torch.zeros(g1 - g0, dtype=torch.long, device=device)
            for t0 in range(0, m, train_chunk_size):
                t1 = min(t0 + train_chunk_size, m)
                # validate each training chunk once (during the first pass over generated rows)
                t = _normalized_rows(train, t0, t1, dtype, device, "train_feats", check=(g0 == 0))
                sim_max, arg = (g @ t.T).max(dim=1)
                better = sim_max > run_sim
                run_sim = torch.where(better, sim_max, run_sim)
                run_idx = torch.where(better, arg + t0, run_idx)
            best_sim[g0:g1] = run_sim
            best_idx[g0:g1] = run_idx
    distances = (1.0 - best_sim).clamp_(0.0, 2.0)
    return distances, best_idx


def min_cosine_distances(
    gen_feats: ArrayLike,
    train_feats: ArrayLike,
    *,
    chunk_size: int = 4096,
    train_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Per generated row, the minimum cosine distance to the training set (``Tensor[N]``), chunked."""
    distances, _ = nearest_neighbors(
        gen_feats, train_feats, chunk_size=chunk_size, train_chunk_size=train_chunk_size, dtype=dtype, device=device
    )
    return distances


def average_min_cosine_distance(
    gen_feats: ArrayLike,
    train_feats: ArrayLike,
    *,
    chunk_size: int = 4096,
    train_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> float:
    """AMD (MemControl eq. 5): mean over generations of the min cosine distance to training; higher = less memorized.

    ``d_amd = 1/N sum_i min_j (1 - cos(x_i, x_j))``. Memory is bounded by the chunk sizes (see
    :func:`nearest_neighbors`); the mean is accumulated in float64.
    """
    distances = min_cosine_distances(
        gen_feats, train_feats, chunk_size=chunk_size, train_chunk_size=train_chunk_size, dtype=dtype, device=device
    )
    return float(distances.double().mean())


def replication_scores(
    gen_feats: ArrayLike,
    train_feats: ArrayLike,
    *,
    threshold: float = 0.5,
    chunk_size: int = 4096,
    train_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Somepalli et al.'s replication metric: top-1 cosine similarity of each generation to the training set.

    Somepalli et al. (NeurIPS 2023) use SSCD copy-detection features and report the mean, the 95th percentile
    and the fraction of generations whose top-1 similarity exceeds 0.5; pass features from whatever encoder
    you use. Chunked like :func:`average_min_cosine_distance`.

    Returns:
        ``{"mean": ..., "p95": ..., "fraction_above": ..., "threshold": ..., "n_generations": ...}``.
    """
    distances = min_cosine_distances(
        gen_feats, train_feats, chunk_size=chunk_size, train_chunk_size=train_chunk_size, dtype=dtype, device=device
    )
    sims = (1.0 - distances.double()).cpu().numpy()
    return {
        "mean": float(sims.mean()),
        "p95": float(np.percentile(sims, 95)),
        "fraction_above": float((sims > threshold).mean()),
        "threshold": float(threshold),
        "n_generations": int(sims.shape[0]),
    }


# ----------------------------------------------------------------------------------------------
# Carlini et al.'s tiled l2
# ----------------------------------------------------------------------------------------------


def _images_to_tiles(
    images: Any, name: str, grid: int, value_range: tuple[float, float], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Validate ``[N, C, H, W]`` images, rescale ``value_range`` to [0, 1]; tiles ``[grid*grid, N, d]`` and shape."""
    if not isinstance(images, torch.Tensor):
        try:
            images = torch.as_tensor(np.asarray(images))
        except Exception as err:  # pragma: no cover - exotic inputs
            raise ValueError(
                f"{name} must be an image array [N, C, H, W]; could not convert {type(images)!r}"
            ) from err
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W]; got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError(f"{name} is empty: expected at least one image, got shape {tuple(images.shape)}")
    if c == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} has an empty channel/spatial axis: got shape {tuple(images.shape)}")
    if h % grid or w % grid:
        raise ValueError(
            f"{name} spatial size {h}x{w} is not divisible by grid={grid}; expected H and W multiples of {grid} "
            "(resize or crop the images first)"
        )
    images = images.detach().to(device=device, dtype=dtype)
    vmin_t, vmax_t = torch.aminmax(images)  # NaN propagates, inf shows up: no full-size mask needed
    vmin, vmax = float(vmin_t), float(vmax_t)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError(f"{name} contains NaN or inf; expected finite pixel values")
    lo, hi = float(value_range[0]), float(value_range[1])
    tol = 1e-3 * (hi - lo)
    if vmin < lo - tol or vmax > hi + tol:
        raise ValueError(
            f"{name} values lie in [{vmin:.4g}, {vmax:.4g}] but value_range=({lo:g}, {hi:g}); expected pixels in "
            "value_range (pass value_range=(-1, 1) for images in [-1, 1], (0, 1) for images in [0, 1])"
        )
    if (lo, hi) != (0.0, 1.0):
        images = (images - lo) / (hi - lo)
    th, tw = h // grid, w // grid
    # [N, C, g, th, g, tw] -> [g, g, N, C, th, tw] -> [g*g, N, C*th*tw]
    tiles = images.reshape(n, c, grid, th, grid, tw).permute(2, 4, 0, 1, 3, 5)
    tiles = tiles.reshape(grid * grid, n, c * th * tw).contiguous()
    if tiles.untyped_storage().data_ptr() == images.untyped_storage().data_ptr():
        tiles = tiles.clone()  # never alias the caller's array (tiles are modified in place)
    return tiles, (n, c, h, w)


def tiled_l2(
    images_a: ArrayLike,
    images_b: ArrayLike | None = None,
    *,
    grid: int = 4,
    reduction: Literal["rms", "sum"] = "rms",
    value_range: tuple[float, float] = (0.0, 1.0),
    chunk_size: int = 512,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Carlini et al.'s tiled l2: max over ``grid x grid`` tiles of the l2 distance between corresponding tiles.

    Images are ``[N, C, H, W]`` with pixels in ``value_range`` (default ``(0, 1)``; pass ``(-1, 1)`` for
    diffusers-style images). They are first rescaled to [0, 1], so thresholds mean the same for both
    conventions. ``H`` and ``W`` must be divisible by ``grid`` (ValueError otherwise). Each image is cut into
    ``grid * grid`` non-overlapping tiles of ``d = C * (H/grid) * (W/grid)`` values; for every pair the l2
    distance of corresponding tiles is taken and the maximum over tiles returned.

    Normalization (``reduction``):
        ``"rms"`` (default): ``||tile_a - tile_b||_2 / sqrt(d)``, the root-mean-square pixel difference of the
        tile, in [0, 1]. This is the normalized l2 Carlini et al. use (l2 divided by the square root of the
        number of dimensions), so values do not depend on resolution.
        ``"sum"``: the plain ``||tile_a - tile_b||_2`` of the [0, 1] tile (what the MemControl authors' code
        computes, where their threshold 20 at 224 px, d = 3*56*56, is about 0.21 on the ``"rms"`` scale).

    Vectorized: per block of ``chunk_size x chunk_size`` pairs, one batched matmul over all tiles
    (``|a|^2 + |b|^2 - 2 a.b`` after centering each tile position, which keeps float32 cancellation small).

    ``device`` (default: that of ``images_a`` when it is a tensor, else CPU) is where the work and the output live.

    Returns:
        ``Tensor[N, M]`` (``M = N`` and a symmetric matrix with a zero diagonal when ``images_b`` is None).
    """
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a positive integer; got {grid!r}")
    grid = int(grid)
    if reduction not in ("rms", "sum"):
        raise ValueError(f"reduction must be 'rms' or 'sum'; got {reduction!r}")
    if len(value_range) != 2 or not value_range[1] > value_range[0]:
        raise ValueError(f"value_range must be (low, high) with high > low; got {value_range!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    chunk_size = _check_chunk(chunk_size, "chunk_size")
    if device is None:
        device = images_a.device if isinstance(images_a, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)

    a, shape_a = _images_to_tiles(images_a, "images_a", grid, value_range, dtype, device)
    same = images_b is None
    if same:
        b = a
    else:
        b, shape_b = _images_to_tiles(images_b, "images_b", grid, value_range, dtype, device)
        if shape_a[1:] != shape_b[1:]:
            raise ValueError(
                f"images_a and images_b have different shapes per image ({shape_a[1:]} vs {shape_b[1:]}); "
                "expected the same [C, H, W]"
            )
    # Centering each tile position by a shared mean leaves distances unchanged and reduces cancellation.
    # (tiles are fresh copies, so centering in place is safe and saves one copy)
    if same:
        center = a.mean(dim=1, keepdim=True)
    else:
        center = (a.sum(dim=1, keepdim=True) + b.sum(dim=1, keepdim=True)) / (a.shape[1] + b.shape[1])
    a -= center
    if not same:
        b -= center
    na = torch.linalg.vector_norm(a, dim=2).square_()  # [T, N], without a full-size temporary
    nb = na if same else torch.linalg.vector_norm(b, dim=2).square_()  # [T, M]
    n, m = a.shape[1], b.shape[1]
    out = torch.empty(n, m, dtype=dtype, device=device)
    with torch.no_grad():
        for i0 in range(0, n, chunk_size):
            i1 = min(i0 + chunk_size, n)
            for j0 in range(0, m, chunk_size):
                j1 = min(j0 + chunk_size, m)
                if same and j1 <= i0:
                    continue  # lower triangle: filled from the upper one below
                sq = torch.baddbmm(
                    na[:, i0:i1, None] + nb[:, None, j0:j1], a[:, i0:i1], b[:, j0:j1].transpose(1, 2), alpha=-2.0
                )
                out[i0:i1, j0:j1] = sq.amax(dim=0)
        if same:
            upper = torch.triu(out, diagonal=1)
            out = upper + upper.T
        out.clamp_(min=0.0).sqrt_()
        if reduction == "rms":
            out /= math.sqrt(a.shape[2])
    return out


# ----------------------------------------------------------------------------------------------
# maximal cliques
# ----------------------------------------------------------------------------------------------


def find_cliques(
    distances: ArrayLike,
    threshold: float,
    min_size: int = 2,
    *,
    max_cliques: int | None = None,
) -> list[list[int]]:
    """All maximal cliques of size >= ``min_size`` in the graph with an edge where ``d < threshold`` (i != j).

    These are true cliques (every pair within ``threshold``), not connected components: a chain a-b-c without
    an a-c edge is two cliques {a, b} and {b, c}. networkx finds them (Bron-Kerbosch with pivoting) on the
    (min_size - 1)-core of the graph (a node of a clique of size k has degree >= k - 1).

    Args:
        distances: square ``[N, N]`` matrix (numpy or torch). It is symmetrized with ``max(d, d.T)`` (an edge
            needs both directions below ``threshold``); the diagonal is ignored.
        threshold: edge when ``d < threshold`` (strict).
        min_size: smallest clique to report (>= 1).
        max_cliques: stop with a RuntimeError after this many reported cliques (guards pathological graphs).

    Returns:
        Cliques as sorted index lists, largest first (ties: lexicographic).
    """
    import networkx as nx

    d = distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor) else np.asarray(distances)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square [N, N] matrix; got shape {tuple(d.shape)}")
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"min_size must be a positive integer; got {min_size!r}")
    min_size = int(min_size)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold!r}")
    n = d.shape[0]
    if n == 0:
        return []
    off_diag = ~np.eye(n, dtype=bool)
    if np.isnan(d[off_diag]).any():
        raise ValueError("distances contains NaN off the diagonal; expected finite or +inf distances")
    adj = (np.maximum(d, d.T) < threshold) & off_diag
    degree = adj.sum(axis=1)
    alive = np.ones(n, dtype=bool)
    while (drop := alive & (degree < min_size - 1)).any():  # the (min_size - 1)-core
        alive &= ~drop
        degree = degree - adj[:, drop].sum(axis=1)
    graph = nx.Graph()
    graph.add_nodes_from(np.flatnonzero(alive).tolist())
    graph.add_edges_from(np.argwhere(np.triu(adj & alive & alive[:, None], 1)).tolist())
    found: list[list[int]] = []
    for clique in nx.find_cliques(graph):
        if len(clique) >= min_size:
            found.append(sorted(int(i) for i in clique))
            if max_cliques is not None and len(found) > max_cliques:
                raise RuntimeError(f"more than max_cliques={max_cliques} maximal cliques; raise the limit")
    found.sort(key=lambda c: (-len(c), c))
    return found


# ----------------------------------------------------------------------------------------------
# Carlini et al.'s extraction attack
# ----------------------------------------------------------------------------------------------


@dataclass
class ExtractionResult:
    """Outcome of :func:`extraction_attack`: counts plus per-prompt cliques and extracted generations.

    Attributes:
        n_extracted: number of training images extracted, i.e. prompts with at least one flagged generation
            within ``match_threshold`` of that prompt's training image (the count Carlini et al. and the
            MemControl tables report).
        n_extracted_generations: number of generations counted as extracted, over all prompts.
        n_flagged_prompts: prompts with at least one clique of size >= ``min_clique_size``.
        n_prompts: prompts evaluated.
        per_prompt: one dict per prompt: ``prompt_index``, ``clique_sizes`` (sizes of the maximal cliques found,
            largest first), ``flagged_indices`` (generations in some clique), ``flagged_distances`` (their tiled
            l2 to the training image), ``extracted_indices`` and ``extracted_distances``.
        threshold, match_threshold, min_clique_size, grid, reduction: the settings used.
    """

    n_extracted: int
    n_extracted_generations: int
    n_flagged_prompts: int
    n_prompts: int
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = DEFAULT_EXTRACTION_THRESHOLD
    match_threshold: float | list[float] = DEFAULT_EXTRACTION_THRESHOLD
    min_clique_size: int = 10
    grid: int = 4
    reduction: str = "rms"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the result (for reports and metric modules)."""
        return asdict(self)


def extraction_attack(
    generations: Sequence[ArrayLike] | ArrayLike,
    training_images: ArrayLike,
    threshold: float = DEFAULT_EXTRACTION_THRESHOLD,
    min_clique_size: int = 10,
    grid: int = 4,
    match_threshold: float | Sequence[float] | None = None,
    *,
    reduction: Literal["rms", "sum"] = "rms",
    value_range: tuple[float, float] = (0.0, 1.0),
    max_cliques: int | None = 100_000,
    device: str | torch.device | None = None,
) -> ExtractionResult:
    """Carlini et al.'s extraction attack: cliques of near-identical generations, matched to the training image.

    For each prompt: tiled l2 (:func:`tiled_l2`) between all its generations, a graph with an edge where the
    distance is below ``threshold``, and its maximal cliques (:func:`find_cliques`). A generation in a clique
    of size >= ``min_clique_size`` is *flagged*; a flagged generation counts as *extracted* when its tiled l2 to
    the prompt's training image is below ``match_threshold`` (default: ``threshold``).

    Defaults and their sources:
        - ``grid=4`` (16 non-overlapping tiles) and ``min_clique_size=10``: Carlini et al., USENIX Security 2023
          (Stable Diffusion attack, run with 500 generations per prompt; generate that many for comparability).
        - ``threshold=0.15`` on the ``"rms"`` scale (tile l2 / sqrt(tile dims), pixels in [0, 1]): our default,
          chosen on the normalized-l2 scale Carlini et al. use (their Fig. 1 reports 0.031 for a near-verbatim
          copy). We recall 0.15 as their extraction cut-off but could not verify the exact thresholds against the
          paper text offline: treat it as a parameter and calibrate it for your data. For reference, the
          MemControl authors' code uses ``reduction="sum"`` with threshold 20 at 224 px (about 0.21 here), 50
          generations per prompt and clique size 3, with connected components instead of cliques.

    Args:
        generations: per prompt ``[G, C, H, W]`` images (a list, or one ``[P, G, C, H, W]`` array).
        training_images: ``[P, C, H, W]``, the training image of each prompt.
        threshold: edge threshold of the clique graph.
        min_clique_size: smallest clique that flags its generations (Carlini et al.: 10).
        grid: tiles per side (Carlini et al.: 4, i.e. 16 tiles).
        match_threshold: distance to the training image below which a flagged generation is extracted: one
            value, or one per prompt (0: that prompt cannot count; see metrics.extraction for calibrated ones).
        reduction: tile distance normalization, see :func:`tiled_l2`.
        value_range: pixel range of all images, ``(0, 1)`` or ``(-1, 1)``.
        max_cliques: per-prompt guard passed to :func:`find_cliques`.
        device: where the tiled distances are computed (default: CPU, or the device of tensor inputs).
    """
    training_images, matches, per_prompt_match = _check_attack_inputs(
        generations, training_images, threshold, min_clique_size, match_threshold)
    per_prompt: list[dict[str, Any]] = []
    for p in range(len(generations)):
        gens = generations[p]
        if not isinstance(gens, torch.Tensor):
            gens = torch.as_tensor(np.asarray(gens))
        if gens.ndim != 4:
            raise ValueError(f"generations[{p}] must have shape [G, C, H, W]; got shape {tuple(gens.shape)}")
        if tuple(gens.shape[1:]) != tuple(training_images.shape[1:]):
            raise ValueError(
                f"generations[{p}] images have shape {tuple(gens.shape[1:])} but training images have "
                f"{tuple(training_images.shape[1:])}; expected the same [C, H, W]"
            )
        per_prompt.append(_attack_prompt(p, gens, training_images[p : p + 1], threshold, min_clique_size,
                                         float(matches[p]), grid, reduction, value_range, max_cliques, device))
    n_prompts = len(per_prompt)
    n_extracted = sum(1 for e in per_prompt if e["extracted_indices"])
    n_extracted_generations = sum(len(e["extracted_indices"]) for e in per_prompt)
    n_flagged = sum(1 for e in per_prompt if e["flagged_indices"])

    return ExtractionResult(
        n_extracted=n_extracted,
        n_extracted_generations=n_extracted_generations,
        n_flagged_prompts=n_flagged,
        n_prompts=n_prompts,
        per_prompt=per_prompt,
        threshold=float(threshold),
        match_threshold=[float(m) for m in matches] if per_prompt_match else float(matches[0]),
        min_clique_size=int(min_clique_size),
        grid=int(grid),
        reduction=reduction,
    )


def clique_share(
    generations: Sequence[ArrayLike] | ArrayLike,
    threshold: float = DEFAULT_EXTRACTION_THRESHOLD,
    grid: int = 4,
    *,
    reduction: Literal["rms", "sum"] = "rms",
    value_range: tuple[float, float] = (0.0, 1.0),
    device: str | torch.device | None = None,
) -> float:
    """Mean over prompts of the share of its generations in their largest clique of near-identical ones, as
    (size - 1) / (G - 1): 0 when all G differ, 1 when all are one image.

    The memorized-prompt count (a prompt whose generations form a clique, Carlini et al.) made continuous, so that a
    search can rank masks by it; the clique graph is :func:`extraction_attack`'s (tiled l2 below ``threshold``).
    """
    shares = []
    for p, gens in enumerate(generations):
        gens = gens if isinstance(gens, torch.Tensor) else torch.as_tensor(np.asarray(gens))
        if gens.ndim != 4 or len(gens) < 2:
            raise ValueError(f"generations[{p}] must have shape [G, C, H, W] with G >= 2; got {tuple(gens.shape)}")
        pair = tiled_l2(gens, grid=grid, reduction=reduction, value_range=value_range, device=device)
        largest = max((len(c) for c in find_cliques(pair, threshold, 2)), default=1)
        shares.append((largest - 1) / (len(gens) - 1))
    if not shares:
        raise ValueError("clique_share needs at least one prompt's generations.")
    return float(np.mean(shares))


def _check_attack_inputs(generations, training_images, threshold: float, min_clique_size: int,
                         match_threshold) -> tuple[torch.Tensor, np.ndarray, bool]:
    """Validated inputs of :func:`extraction_attack`: training images as a tensor, one match threshold per prompt,
    and whether they were given per prompt."""
    match_threshold = threshold if match_threshold is None else match_threshold
    per_prompt_match = not np.isscalar(match_threshold)
    matches = np.asarray(match_threshold, dtype=np.float64).reshape(-1)
    if not (threshold > 0 and (matches >= 0).all() and (per_prompt_match or matches[0] > 0)):
        raise ValueError(f"threshold and match_threshold must be > 0 (per-prompt match thresholds >= 0); got "
                         f"{threshold!r}, {match_threshold!r}")
    if int(min_clique_size) != min_clique_size or min_clique_size < 2:
        raise ValueError(f"min_clique_size must be an integer >= 2; got {min_clique_size!r}")
    if not isinstance(training_images, torch.Tensor):
        training_images = torch.as_tensor(np.asarray(training_images))
    if training_images.ndim != 4:
        raise ValueError(f"training_images must have shape [P, C, H, W]; got shape {tuple(training_images.shape)}")
    n_prompts = len(generations)
    if n_prompts == 0:
        raise ValueError("generations is empty: expected one [G, C, H, W] array per prompt")
    if n_prompts != training_images.shape[0]:
        raise ValueError(
            f"got generations for {n_prompts} prompts but {training_images.shape[0]} training images; "
            "expected one training image per prompt"
        )
    if per_prompt_match and len(matches) != n_prompts:
        raise ValueError(f"got {len(matches)} per-prompt match thresholds for {n_prompts} prompts")
    return training_images, np.broadcast_to(matches, (n_prompts,)), per_prompt_match


def _attack_prompt(p: int, gens: torch.Tensor, training_image: torch.Tensor, threshold: float, min_clique_size: int,
                   match: float, grid: int, reduction: str, value_range: tuple[float, float],
                   max_cliques: int | None, device) -> dict[str, Any]:
    """One prompt of the attack: its cliques, the flagged generations and those within `match` of its image."""
    pair = tiled_l2(gens, grid=grid, reduction=reduction, value_range=value_range, device=device)
    cliques = find_cliques(pair, threshold, min_clique_size, max_cliques=max_cliques)
    flagged = sorted({i for c in cliques for i in c})
    entry: dict[str, Any] = {"prompt_index": p, "clique_sizes": [len(c) for c in cliques], "flagged_indices": flagged,
                             "flagged_distances": [], "extracted_indices": [], "extracted_distances": []}
    if flagged:
        to_train = tiled_l2(gens[flagged], training_image, grid=grid, reduction=reduction, value_range=value_range,
                            device=device)[:, 0].tolist()
        hits = [(i, dist) for i, dist in zip(flagged, to_train) if dist < match]
        entry.update(flagged_distances=to_train, extracted_indices=[i for i, _ in hits],
                     extracted_distances=[dist for _, dist in hits])
    return entry
