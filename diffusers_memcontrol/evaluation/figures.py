"""The paper's Fig. 4: training images next to what each method generates for their captions.

A stage-2 run that evaluates extraction keeps a few of its D_mem generations in ``dmem_generations.safetensors``
(:func:`save_dmem_generations`); :func:`memorization_figure` lays them out as ``memorization.png``.

Privacy: both files hold training images (and generations that may copy them). They stay in the local output
folder: ``memcontrol publish`` never uploads them (``hub.PRIVATE_FILES``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..constants import DMEM_GENERATIONS_FILE, MEMORIZATION_FIGURE
from ..files import atomic_path

__all__ = ["DMEM_GENERATIONS_FILE", "MEMORIZATION_FIGURE", "load_dmem_generations", "memorization_figure",
           "save_dmem_generations", "write_memorization_figure"]

CLIQUE, EXTRACTED, COPY = 1, 2, 4  # bits of the per-generation flags (COPY: a nearest-neighbour copy)
_KEPT_PER_PROMPT = 8
_MAX_SIZE = 128
_COLORS = {EXTRACTED: "tab:red", COPY: "tab:purple", CLIQUE: "tab:orange"}


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], shrunk to at most _MAX_SIZE pixels a side, as uint8."""
    if images.shape[-1] > _MAX_SIZE:
        images = torch.nn.functional.interpolate(images, size=(_MAX_SIZE, _MAX_SIZE), mode="area")
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def save_dmem_generations(path: str | os.PathLike, generations: torch.Tensor, training_images: torch.Tensor,
                          flags: torch.Tensor, round_trips: torch.Tensor | None = None) -> str:
    """Keep up to 8 generations per D_mem prompt, the most flagged first (by flag value), with their training image.

    ``generations`` is ``[P, G, C, H, W]`` and ``training_images`` ``[P, C, H, W]`` in [-1, 1]; ``flags`` is
    ``[P, G]`` (bit 1: clique member, bit 2: extracted, bit 4: nearest-neighbour copy); ``round_trips`` (optional,
    ``[P, C, H, W]``): the training images through the pipeline's VAE, the ceiling of what a generation can look
    like. Stored as uint8, at most 128 px a side.
    """
    from safetensors.torch import save_file

    flags = flags.to(torch.int64)
    order = torch.argsort(-flags * flags.shape[1] + torch.arange(flags.shape[1]), dim=1)[:, :_KEPT_PER_PROMPT]
    kept = torch.stack([generations[p, order[p]] for p in range(len(order))])
    tensors = {"generations": _to_uint8(kept.flatten(0, 1)).unflatten(0, tuple(kept.shape[:2])),
               "training_images": _to_uint8(training_images),
               "flags": torch.gather(flags, 1, order).to(torch.uint8)}
    if round_trips is not None:
        tensors["round_trips"] = _to_uint8(round_trips)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    return str(path)


def load_dmem_generations(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``generations`` [P, K, C, H, W], ``training_images`` [P, C, H, W] (uint8), ``flags`` [P, K] and, when
    saved, ``round_trips`` [P, C, H, W]."""
    from safetensors.torch import load_file

    return load_file(str(path))


def memorization_figure(runs: Mapping[str, str], path: str, n_pairs: int = 4, n_generations: int = 4) -> str:
    """Fig. 4: one row per D_mem pair (the training image, its VAE round trip when saved: the ceiling, then
    generations of each run), flagged ones framed.

    ``runs`` maps a column title to a run folder holding ``dmem_generations.safetensors``; the pairs shown are
    those the first run flags most. Red frame: extracted; purple: a nearest-neighbour copy (not extracted); orange:
    clique member (neither).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    data = {title: load_dmem_generations(os.path.join(folder, DMEM_GENERATIONS_FILE)) for title, folder in runs.items()}
    first = next(iter(data.values()))
    score = (first["flags"] & (EXTRACTED | COPY) > 0).sum(1) * 100 + (first["flags"] > 0).sum(1)
    pairs = torch.argsort(-score, stable=True)[:n_pairs].tolist()
    ceiling = next((run["round_trips"] for run in data.values() if "round_trips" in run), None)
    cols = 1 + (ceiling is not None) + len(data) * n_generations
    fig, axes = plt.subplots(len(pairs), cols, figsize=(0.9 * cols, 0.95 * len(pairs) + 0.9), dpi=100,
                             squeeze=False)
    for row, pair in enumerate(pairs):
        cells = [(first["training_images"][pair], 0, "training image")]
        if ceiling is not None:
            cells.append((ceiling[pair], 0, "VAE (ceiling)"))
        for title, run in data.items():
            k = min(n_generations, run["generations"].shape[1])
            cells += [(run["generations"][pair, j], int(run["flags"][pair, j]), title) for j in range(k)]
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(cells):
                ax.axis("off")
                continue
            image, flag, title = cells[col]
            ax.imshow(image.permute(1, 2, 0).numpy(), cmap="gray")
            color = next((_COLORS[bit] for bit in (EXTRACTED, COPY, CLIQUE) if flag & bit), None)
            for spine in ax.spines.values():
                spine.set_visible(color is not None)
                if color:
                    spine.set_edgecolor(color)
                    spine.set_linewidth(3)
            fixed = 1 + (ceiling is not None)
            if row == 0 and (col < fixed or (col - fixed) % n_generations == 0):
                ax.set_title(title, fontsize=7, loc="left")
    fig.legend(handles=[Patch(edgecolor=_COLORS[EXTRACTED], facecolor="none", lw=2, label="extracted"),
                        Patch(edgecolor=_COLORS[COPY], facecolor="none", lw=2, label="nearest-neighbour copy"),
                        Patch(edgecolor=_COLORS[CLIQUE], facecolor="none", lw=2, label="clique member")],
               loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_memorization_figure(rows: Sequence[dict[str, Any]], output_dir: str) -> str | None:
    """memorization.png of stage 2: Full FT, MemControl, the best other baseline (lowest FID) and Freeze (the floor),
    no mitigation, beside the training images and their VAE round trips (the ceiling).

    Reads ``output_dir/final/<method>-none``; returns None when those runs kept no generations.
    """
    from .reporting import ROW_NAMES

    plain = {r["method"]: r for r in rows if r.get("mitigation", "none") == "none"}
    others = [r for m, r in plain.items() if m not in ("full", "memcontrol", "freeze") and r.get("fid") is not None]
    methods = [m for m in ("full", "memcontrol") if m in plain]
    if others:
        methods.append(min(others, key=lambda r: r["fid"])["method"])
    runs = {ROW_NAMES.get(m, m): os.path.join(output_dir, "final", f"{m}-none") for m in methods}
    if not runs or not all(os.path.isfile(os.path.join(f, DMEM_GENERATIONS_FILE)) for f in runs.values()):
        return None
    floor = os.path.join(output_dir, "final", "freeze-none")
    if "freeze" in plain and os.path.isfile(os.path.join(floor, DMEM_GENERATIONS_FILE)):
        runs[ROW_NAMES["freeze"] + " (floor)"] = floor
    # holds training images: written to the local output folder only, never published (hub.PRIVATE_FILES)
    return memorization_figure(runs, os.path.join(output_dir, MEMORIZATION_FIGURE))
