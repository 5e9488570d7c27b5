"""The paper's comparison table (Table 1) and Pareto plot (Figure 3) for a user's own data."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..constants import RESULTS_JSON, RESULTS_MARKDOWN
from ..files import atomic_path, write_json_atomic, write_text_atomic

TABLE_COLUMNS = (
    ("fid", "FID ↓"),
    ("kid", "KID ↓"),
    ("c2st_accuracy", "C2ST acc. ↓"),
    ("in_domain", "In-domain ↑"),
    ("amd", "AMD ↑"),
    ("agreement", "Agreement ↑"),
    ("extracted_images", "Extracted (calibrated) ↓"),
    ("copied_images", "Copies (nearest-neighbour) ↓"),
    ("memorized_prompts", "Memorized prompts ↓"),
    ("dmem", "d_mem ↓"),
    ("trainable_params", "Trainable params"),
)
_QUALITY = {"fid", "kid", "c2st_accuracy", "in_domain", "agreement"}  # the columns the ceiling row fills
NOISE_COLUMNS = (("fid_noise", "FID"), ("kid_noise", "KID"), ("c2st_accuracy_noise", "C2ST acc."),
                 ("in_domain_noise", "In-domain"), ("agreement_noise", "Agreement"))
CEILING = "ceiling"
ROW_ORDER = (CEILING, "freeze", "full", "svdiff", "difffit", "attention", "memcontrol")
ROW_NAMES = {CEILING: "Real test images through the VAE (ceiling)", "freeze": "Freeze", "full": "Full FT",
             "svdiff": "SV-DIFF", "difffit": "DiffFit", "attention": "Attention tuning", "memcontrol": "MemControl",
             "lora": "LoRA"}
MITIGATION_NAMES = {"none": "—", "rwa": "RWA", "threshold": "Threshold"}


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ceiling_row(metrics: dict) -> dict | None:
    """The table row of the ceiling (real eval images through the base's VAE) from a run's metrics, or None."""
    ceiling = metrics.get(CEILING)
    if not isinstance(ceiling, dict):
        return None
    return {"method": CEILING, "peft_method": None, "mitigation": "none",
            **{k: v for k, v in ceiling.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               or v is None}}


def results_markdown(rows: Sequence[dict]) -> str:
    """Markdown table with one row per (method, mitigation) and the paper's metric columns; the ceiling first (the
    best any fine-tune can reach on the quality columns), then Freeze (the floor). A second table gives each quality
    metric's noise (two disjoint halves of one model's generations) where the rows hold it."""
    order = {m: i for i, m in enumerate(ROW_ORDER)}
    mitigations = list(MITIGATION_NAMES)
    rows = sorted(rows, key=lambda r: (order.get(r["method"], len(order)),
                                       mitigations.index(r.get("mitigation", "none"))))
    header = "| Method | Mitigation | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (2 + len(TABLE_COLUMNS))]
    for r in rows:
        cells = [ROW_NAMES.get(r["method"], r["method"]), MITIGATION_NAMES.get(r.get("mitigation", "none"), "?")]
        cells += [_format(r.get(key)) if r["method"] != CEILING or key in _QUALITY else "—"
                  for key, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    noise = [(key, title) for key, title in NOISE_COLUMNS if any(r.get(key) is not None for r in rows)]
    if noise:
        lines += ["", ("Noise of each quality metric: |metric(half A) - metric(half B)| over two disjoint halves of "
                       "one row's generations."), "",
                  "| Method | Mitigation | " + " | ".join(title for _, title in noise) + " |",
                  "|" + "---|" * (2 + len(noise))]
        for r in rows:
            cells = [ROW_NAMES.get(r["method"], r["method"]), MITIGATION_NAMES.get(r.get("mitigation", "none"), "?")]
            lines.append("| " + " | ".join(cells + [_format(r.get(key)) for key, _ in noise]) + " |")
    return "\n".join(lines) + "\n"



def write_results(rows: Sequence[dict], output_dir: str) -> tuple[str, str]:
    """Write results.md and results.json atomically; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    md_path = os.path.join(output_dir, RESULTS_MARKDOWN)
    json_path = os.path.join(output_dir, RESULTS_JSON)
    write_text_atomic(md_path, results_markdown(rows))
    write_json_atomic(json_path, list(rows))
    return md_path, json_path


# what a search trial's quality value is, for each --search_quality_objective (evaluation.config.quality_objective)
QUALITY_OBJECTIVE_LABELS = {"fid": "FID", "kid": "KID", "c2st": "C2ST accuracy", "agreement": "1 - agreement",
                            "fid_agreement": "FID x (1 - agreement)"}
MEMORIZATION_OBJECTIVE_LABELS = {"dmem": "d_mem", "cliques": "clique share of D_mem generations"}


def pareto_plot(
    trials: Sequence[dict],
    front: Sequence[int],
    chosen: int | None,
    path: str,
    baselines: dict[str, tuple[float, float]] | None = None,
    title: str = "MemControl search",
    quality_metric: str = "fid",
    memorization_metric: str = "dmem",
    budget: float | None = None,
) -> str:
    """Figure 3: every trial (memorization vs quality objective), the Pareto front, the chosen mask and the baselines;
    saved as PNG. `quality_metric`/`memorization_metric` name what the objectives measure (the axis labels); `budget`
    draws the memorization budget (--max_memorization) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [t for t in trials if None not in (t.get("memorization_objective"), t.get("quality_objective"))]
    if not done:
        raise ValueError("No completed trial with both objectives to plot.")

    def point(t: dict) -> tuple[float, float]:
        return t["memorization_objective"], t["quality_objective"]

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(*zip(*map(point, done)), s=18, c="0.65", label="trials")
    front_points = sorted(point(t) for t in done if t["number"] in set(front))
    if front_points:
        ax.plot(*zip(*front_points), "-o", color="tab:blue", ms=5, label="Pareto front")
    for t in done:
        if t["number"] == chosen:
            ax.scatter(*zip(point(t)), marker="*", s=220, c="tab:red", zorder=5, label="chosen mask")
    if budget is not None:
        ax.axvline(budget, ls="--", c="tab:green", lw=1, label="memorization budget")
    markers = iter("sD^vP<>")
    for name, (memorization, quality) in (baselines or {}).items():
        ax.scatter([memorization], [quality], marker=next(markers, "x"), s=60, zorder=4, label=name)
    ax.set_xlabel(f"{MEMORIZATION_OBJECTIVE_LABELS.get(memorization_metric, memorization_metric)} "
                  "(memorization, lower is better)")
    ax.set_ylabel(f"{QUALITY_OBJECTIVE_LABELS.get(quality_metric, quality_metric)} (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
