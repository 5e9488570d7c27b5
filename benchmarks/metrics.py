"""Benchmark the memorization metrics against naive references; writes ``benchmarks/results/metrics.json``.

(a) AMD (eq. 5): the chunked torch implementation vs scipy's full ``cdist`` matrix and vs a per-pair Python loop
    (timed on a subset of pairs and scaled to all pairs).
(b) Carlini et al.'s extraction step for one prompt with 500 generations: vectorized tiled l2 vs a naive loop
    over pairs (and over the 16 tiles) in Python; the same clique finder runs on both matrices and must agree.
(b') The clique finder alone on a dense random geometric graph (thousands of maximal cliques, verified).
(c) The vectorized tiled l2 at 224 px (the MemControl evaluation size) vs the naive loop on a subset, scaled.
(d) d_mem, search variant: cost per D_mem image (one batched cond + uncond forward) vs two forwards per image, on
    the tiny base and on the SD1.5 UNet shape at 64x64 latents (random weights).

Peak memory is the resident-set size above the pre-call baseline, sampled every 2 ms in a background thread.
Run: ``python benchmarks/metrics.py`` (about a minute on 2 CPU cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from scipy.spatial.distance import cdist

try:
    from diffusers_memcontrol.metrics.distances import (
        average_min_cosine_distance,
        find_cliques,
        tiled_l2,
    )
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffusers_memcontrol.metrics.distances import (
        average_min_cosine_distance,
        find_cliques,
        tiled_l2,
    )

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"


@contextlib.contextmanager
def peak_rss(interval_s: float = 0.002) -> Iterator[dict[str, float]]:
    """Sample this process's RSS in a thread; on exit ``stats["peak_mb"]`` is the maximum above the baseline."""
    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stats = {"peak_mb": 0.0}
    try:
        yield stats
    finally:
        peak[0] = max(peak[0], process.memory_info().rss)
        stop.set()
        thread.join()
        stats["peak_mb"] = (peak[0] - baseline) / 2**20


def measure(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float, float]:
    """Run ``fn`` ``repeat`` times: (result, best wall seconds, largest peak RSS delta in MB)."""
    best, peak = float("inf"), 0.0
    for _ in range(repeat):
        with peak_rss() as mem:
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
        best, peak = min(best, elapsed), max(peak, mem["peak_mb"])
    return out, best, peak


# --------------------------------------------------------------------------------------------- references


def amd_cdist(gen: np.ndarray, train: np.ndarray) -> float:
    """Naive AMD: the full [N, M] cosine-distance matrix from scipy, then row minima."""
    return float(cdist(gen, train, "cosine").min(axis=1).mean())


def amd_pair_loop(gen: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Naive AMD pieces: per-pair cosine distances in a Python loop (row minima returned)."""
    out = np.empty(gen.shape[0])
    for i, g in enumerate(gen):
        best = np.inf
        gn = np.sqrt(g @ g)
        for t in train:
            best = min(best, 1.0 - (g @ t) / (gn * np.sqrt(t @ t)))
        out[i] = best
    return out


def tiled_pair_loop(images: np.ndarray, grid: int, pairs: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Naive tiled l2 ("rms"): loop over pairs and over tiles in Python; symmetric matrix (NaN if not computed)."""
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    scale = np.sqrt(c * th * tw)
    out = np.full((n, n), np.nan)
    np.fill_diagonal(out, 0.0)
    if pairs is None:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for i, j in pairs:
        worst = 0.0
        for gy in range(grid):
            for gx in range(grid):
                ta = images[i, :, gy * th : (gy + 1) * th, gx * tw : (gx + 1) * tw]
                tb = images[j, :, gy * th : (gy + 1) * th, gx * tw : (gx + 1) * tw]
                worst = max(worst, float(np.linalg.norm(ta - tb)) / scale)
        out[i, j] = out[j, i] = worst
    return out


def planted_generations(rng: np.random.Generator, n: int, copies: int, shape: tuple[int, ...]) -> np.ndarray:
    """``n`` uniform-noise images of ``shape`` of which the first ``copies`` are near-copies of one image."""
    images = rng.uniform(size=(n, *shape)).astype(np.float32)
    images[:copies] = np.clip(images[0] + 0.01 * rng.normal(size=(copies, *shape)), 0, 1)
    return images


# --------------------------------------------------------------------------------------------- benchmarks


def bench_amd(rng: np.random.Generator, n_gen: int, n_train: int, dim: int, loop_pairs: tuple[int, int]) -> dict:
    """(a) chunked AMD vs scipy cdist vs a per-pair Python loop (subset, scaled)."""
    gen = rng.normal(size=(n_gen, dim)).astype(np.float32)
    train = rng.normal(size=(n_train, dim)).astype(np.float32)
    gen[: n_gen // 10] = train[: n_gen // 10] + 0.05 * rng.normal(size=(n_gen // 10, dim))  # some near-copies
    average_min_cosine_distance(gen[:8], train[:64])  # warm-up (thread pool, allocator)

    chunked, t_chunk, m_chunk = measure(lambda: average_min_cosine_distance(gen, train), repeat=3)
    small, t_small, m_small = measure(
        lambda: average_min_cosine_distance(gen, train, chunk_size=256, train_chunk_size=1024), repeat=3
    )
    full, t_cdist, m_cdist = measure(lambda: amd_cdist(gen, train))
    lg, lt = loop_pairs
    sub, t_loop, _ = measure(lambda: amd_pair_loop(gen[:lg].astype(np.float64), train[:lt].astype(np.float64)))
    loop_est = t_loop * (n_gen * n_train) / (lg * lt)
    sub_ref = cdist(gen[:lg], train[:lt], "cosine").min(axis=1)
    return {
        "n_gen": n_gen,
        "n_train": n_train,
        "dim": dim,
        "amd": chunked,
        "abs_diff_vs_cdist": abs(chunked - full),
        "chunked": {"time_s": t_chunk, "peak_rss_mb": m_chunk, "chunk_size": 4096, "train_chunk_size": 4096},
        "chunked_small_blocks": {
            "time_s": t_small,
            "peak_rss_mb": m_small,
            "chunk_size": 256,
            "train_chunk_size": 1024,
            "abs_diff": abs(small - chunked),
        },
        "cdist_full_matrix": {"time_s": t_cdist, "peak_rss_mb": m_cdist},
        "python_pair_loop": {
            "pairs_timed": lg * lt,
            "time_s_measured": t_loop,
            "time_s_estimated_all_pairs": loop_est,
            "max_abs_diff_on_subset": float(np.abs(sub - sub_ref).max()),
        },
        "speedup_vs_cdist": t_cdist / t_chunk,
        "speedup_vs_python_loop_estimated": loop_est / t_chunk,
        "memory_ratio_cdist_over_chunked": m_cdist / max(m_chunk, 1e-9),
    }


def bench_extraction(rng: np.random.Generator, n_gen: int, copies: int, shape: tuple[int, ...]) -> dict:
    """(b) one prompt: vectorized tiled l2 + cliques vs the naive pair loop + the same clique finder."""
    images = planted_generations(rng, n_gen, copies, shape)
    tensor = torch.from_numpy(images)
    tiled_l2(tensor[:8], grid=4)  # warm-up
    fast, t_fast, m_fast = measure(lambda: tiled_l2(tensor, grid=4), repeat=3)
    naive, t_naive, m_naive = measure(lambda: tiled_pair_loop(images, grid=4))
    threshold, k = 0.15, 10
    cliques_fast, t_clq, m_clq = measure(lambda: find_cliques(fast, threshold, k), repeat=3)
    cliques_naive, t_clq_naive, _ = measure(lambda: find_cliques(naive, threshold, k))
    return {
        "n_generations": n_gen,
        "image_shape": list(shape),
        "grid": 4,
        "threshold_rms": threshold,
        "min_clique_size": k,
        "planted_copies": copies,
        "max_abs_diff_distances": float(np.abs(fast.numpy() - naive).max()),
        "cliques_agree": cliques_fast == cliques_naive,
        "clique_sizes": [len(c) for c in cliques_fast],
        "vectorized_distances": {"time_s": t_fast, "peak_rss_mb": m_fast},
        "naive_pair_loop_distances": {"time_s": t_naive, "peak_rss_mb": m_naive, "pairs": n_gen * (n_gen - 1) // 2},
        "clique_step": {"time_s": t_clq, "peak_rss_mb": m_clq, "time_s_on_naive_matrix": t_clq_naive},
        "speedup_distances": t_naive / t_fast,
        "speedup_distances_plus_cliques": (t_naive + t_clq_naive) / (t_fast + t_clq),
    }


def bench_clique_stress(rng: np.random.Generator, n: int, threshold: float, k: int) -> dict:
    """Clique finder on a dense random geometric graph (many overlapping cliques); every answer is verified."""
    points = rng.uniform(size=(n, 2))
    dist = cdist(points, points)
    cliques, t_clq, m_clq = measure(lambda: find_cliques(dist, threshold, k), repeat=3)
    adj = (dist < threshold) & ~np.eye(n, dtype=bool)
    all_cliques = all(adj[np.ix_(c, c)].sum() == len(c) * (len(c) - 1) for c in cliques)
    maximal = all(not (adj[:, c].all(axis=1) & ~np.isin(np.arange(n), c)).any() for c in cliques)
    return {
        "n_nodes": n,
        "average_degree": float(adj.sum(axis=1).mean()),
        "min_clique_size": k,
        "n_maximal_cliques": len(cliques),
        "largest_clique": len(cliques[0]) if cliques else 0,
        "time_s": t_clq,
        "peak_rss_mb": m_clq,
        "all_are_cliques": bool(all_cliques),
        "all_are_maximal": bool(maximal),
    }


def bench_tiled_224(rng: np.random.Generator, n_gen: int, loop_pairs: int) -> dict:
    """(c) vectorized tiled l2 at 3x224x224 vs the naive loop on a subset of pairs, scaled."""
    shape = (3, 224, 224)
    images = planted_generations(rng, n_gen, 20, shape)
    fast, t_fast, m_fast = measure(lambda: tiled_l2(torch.from_numpy(images), grid=4), repeat=2)
    pairs = [(int(i), int(j)) for i, j in zip(*np.triu_indices(n_gen, 1), strict=True)]
    sel = [pairs[i] for i in rng.choice(len(pairs), size=loop_pairs, replace=False)]
    naive, t_loop, _ = measure(lambda: tiled_pair_loop(images, grid=4, pairs=sel))
    rows, cols = zip(*sel, strict=True)
    est = t_loop * len(pairs) / loop_pairs
    return {
        "n_generations": n_gen,
        "image_shape": list(shape),
        "vectorized": {"time_s": t_fast, "peak_rss_mb": m_fast},
        "naive_pair_loop": {
            "pairs_timed": loop_pairs,
            "time_s_measured": t_loop,
            "time_s_estimated_all_pairs": est,
        },
        "max_abs_diff_on_subset": float(np.abs(fast.numpy()[rows, cols] - naive[rows, cols]).max()),
        "speedup_estimated": est / t_fast,
    }


def bench_dmem(n_tiny: int, n_sd15: int, batch_size: int = 16) -> dict:
    """d_mem, search variant: seconds per D_mem image, batched (cond + uncond in one forward, `dmem_search`) vs two
    forwards per image; on the shipped tiny base and on the SD1.5 UNet shape (random weights, 64x64 latents)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffusers_memcontrol.data.tiny_base import tiny_base_path

    sys.path.insert(0, str(Path(__file__).parent))
    from sd15 import SD15_UNET

    torch.manual_seed(0)
    tiny = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet").eval()
    with open(os.path.join(tiny_base_path(), "text_encoder", "config.json"), encoding="utf-8") as f:
        tiny_tokens = json.load(f)["max_position_embeddings"]
    models = [("tiny base", tiny, n_tiny, tiny_tokens)]
    if n_sd15:
        models.append(("SD1.5 UNet shape, 64x64 latents", UNet2DConditionModel(**SD15_UNET).eval(), n_sd15, 77))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return {name: _dmem_costs(unet, scheduler, n, tokens, min(batch_size, n)) for name, unet, n, tokens in models}


def _dmem_costs(unet: Any, scheduler: Any, n: int, tokens: int, batch_size: int) -> dict:
    """Seconds per image of `dmem_search` and of two plain forwards per image, on `n` random D_mem latents."""
    from diffusers_memcontrol.metrics.memorization import dmem_search

    size, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(n, channels, size, size)
    prompts = torch.randn(n, tokens, unet.config.cross_attention_dim)
    uncond = torch.randn(1, tokens, unet.config.cross_attention_dim)

    def batched():
        return dmem_search(unet, scheduler, latents, prompts, uncond, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def per_image():
        norms = []
        for i in range(n):
            t = torch.randint(0, 1000, (1,))
            x = scheduler.add_noise(latents[i:i + 1], torch.randn_like(latents[i:i + 1]), t)
            cond = unet(x, t, encoder_hidden_states=prompts[i:i + 1]).sample
            free = unet(x, t, encoder_hidden_states=uncond).sample
            norms.append((cond - free).flatten().norm())
        return torch.stack(norms)

    batched()  # warm-up
    _, fast_s, fast_mb = measure(batched)
    _, slow_s, _ = measure(per_image)
    return {"n_images": n, "latent": [channels, size, size], "batch_size": batch_size,
            "batched_s_per_image": fast_s / n, "batched_peak_rss_mb": fast_mb,
            "two_forwards_s_per_image": slow_s / n, "speedup": slow_s / fast_s}


def markdown(results: dict) -> str:
    """A small markdown table of the key numbers."""
    a, b, c = results["amd"], results["extraction_500"], results["tiled_l2_224px"]
    d = results["clique_stress"]
    nan = float("nan")
    amd_size = f"{a['n_gen']}x{a['n_train']}, D={a['dim']}"
    ext_size = f"{b['n_generations']} gens {'x'.join(map(str, b['image_shape']))}"
    big_size = f"{c['n_generations']} gens {'x'.join(map(str, c['image_shape']))}"
    rows = [
        (f"AMD chunked torch ({amd_size})", a["chunked"]["time_s"], a["chunked"]["peak_rss_mb"], ""),
        (
            "AMD scipy cdist, full matrix",
            a["cdist_full_matrix"]["time_s"],
            a["cdist_full_matrix"]["peak_rss_mb"],
            f"{a['speedup_vs_cdist']:.1f}x",
        ),
        (
            "AMD Python pair loop (est.)",
            a["python_pair_loop"]["time_s_estimated_all_pairs"],
            nan,
            f"{a['speedup_vs_python_loop_estimated']:.0f}x",
        ),
        (
            f"tiled l2 vectorized ({ext_size})",
            b["vectorized_distances"]["time_s"],
            b["vectorized_distances"]["peak_rss_mb"],
            "",
        ),
        (
            "tiled l2 Python pair loop",
            b["naive_pair_loop_distances"]["time_s"],
            b["naive_pair_loop_distances"]["peak_rss_mb"],
            f"{b['speedup_distances']:.0f}x",
        ),
        ("clique step (Bron-Kerbosch, k-core)", b["clique_step"]["time_s"], b["clique_step"]["peak_rss_mb"], ""),
        (
            "tiled l2 + cliques vs loop + cliques",
            b["vectorized_distances"]["time_s"] + b["clique_step"]["time_s"],
            nan,
            f"{b['speedup_distances_plus_cliques']:.0f}x",
        ),
        (
            f"clique stress ({d['n_nodes']} nodes, avg degree {d['average_degree']:.0f}, {d['n_maximal_cliques']} cliques)",
            d["time_s"],
            d["peak_rss_mb"],
            "",
        ),
        (f"tiled l2 vectorized ({big_size})", c["vectorized"]["time_s"], c["vectorized"]["peak_rss_mb"], ""),
        (
            "tiled l2 Python pair loop (est.)",
            c["naive_pair_loop"]["time_s_estimated_all_pairs"],
            nan,
            f"{c['speedup_estimated']:.0f}x",
        ),
    ]
    for name, r in results.get("dmem_search", {}).items():
        rows.append((f"d_mem search variant per D_mem image ({name}, batch {r['batch_size']})",
                     r["batched_s_per_image"], r["batched_peak_rss_mb"], f"{r['speedup']:.1f}x"))
    lines = ["| step | time (s) | peak RSS delta (MB) | speed-up of the fast path |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {t:.3f} | {m:.1f} | {s} |" for name, t, m, s in rows]
    return "\n".join(lines)


def main() -> None:
    """Run all benchmarks, write the JSON, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if args.quick:
        amd = bench_amd(rng, 200, 2000, 64, (10, 100))
        ext = bench_extraction(rng, 80, 15, (3, 32, 32))
        stress = bench_clique_stress(rng, 100, 0.25, 5)
        t224 = bench_tiled_224(rng, 40, 50)
        dmem = bench_dmem(16, 0)
    else:
        amd = bench_amd(rng, 1000, 20000, 256, (20, 500))
        ext = bench_extraction(rng, 500, 40, (3, 64, 64))
        stress = bench_clique_stress(rng, 500, 0.25, 10)
        t224 = bench_tiled_224(rng, 500, 1000)
        dmem = bench_dmem(100, 4, batch_size=4)
    results = {
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "device": "cpu",
            "quick": args.quick,
        },
        "amd": amd,
        "extraction_500": ext,
        "clique_stress": stress,
        "tiled_l2_224px": t224,
        "dmem_search": dmem,
        "total_time_s": time.perf_counter() - start,
        "notes": (
            "peak_rss_mb = RSS above the pre-call baseline, sampled every 2 ms. Fast paths: best of 2-3 runs after a "
            "warm-up; naive references: one run. Loop timings marked 'estimated' are "
            "measured on a subset of pairs and scaled linearly to all pairs. Tiled l2 uses reduction='rms', 16 tiles."
        ),
    }
    from diffusers_memcontrol.files import write_json_atomic

    write_json_atomic(args.output, results)
    print(markdown(results))
    print(f"\nwrote {args.output} in {results['total_time_s']:.1f} s")


if __name__ == "__main__":
    main()
