"""The model card of a published run: its template, base model, metrics (model-index) and the audit's figures."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..constants import PACKAGE_DIR, SUMMARY_FILE, TRAINING_CONFIG_FILE
from ..tuners import Mask

# the base model of runs without --pretrained_model_name_or_path (diffusers_memcontrol.data.tiny_base.tiny_base_path())
TINY_BASE_NAME = "diffusers-memcontrol/tiny_base"
CARD_TEMPLATE = "memcontrol_card.md"
# where the audit's attacked prompts came from (audit.json's `prompts`)
PROMPT_SOURCES = {"run": "the run's D_mem", "dmem": "D_mem", "scan": "the top of the scan"}
# numeric metrics.json entries that describe the run rather than evaluate it
_NOT_A_METRIC = re.compile(
    r"^(seed|steps?|epochs?|n_.*|num_.*|trainable.*|.*_steps|.*batch_size|.*learning_rate|lr|.*seconds|.*_s|"
    r"wall.*|.*time.*|.*rank|.*alpha|.*dropout|.*decay|.*warmup.*|.*threshold|.*scale|.*probability|.*_version)$",
    re.IGNORECASE,
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MAX_EVAL_RESULTS = 50


def read_json(path: str) -> Any:
    """The JSON value in `path`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def card_template_path() -> str:
    """Path of the model-card template: `hub_cards/` of a source checkout, else the copy installed with the package."""
    package = Path(PACKAGE_DIR)
    candidates = (
        package.parent / "hub_cards" / CARD_TEMPLATE,  # source checkout / editable install
        package / "hub_cards" / CARD_TEMPLATE,  # installed wheel (setup.py maps hub_cards/ into the package)
        package / "assets" / "hub_cards" / CARD_TEMPLATE,
    )
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"Model-card template {CARD_TEMPLATE} not found; looked in {[str(c) for c in candidates]}.")


def _flatten_numbers(data: Any, prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            out += _flatten_numbers(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data):
        out.append((prefix, data))
    return out


def _metric_entries(metrics: dict) -> list[tuple[str, float]]:
    scope = metrics.get("metrics") if isinstance(metrics.get("metrics"), dict) else metrics
    # the ceiling (real images through the VAE) and the noise estimates are references, not this model's results
    entries = [(name, value) for name, value in _flatten_numbers(scope)
               if not _NOT_A_METRIC.match(name.rsplit("/", 1)[-1]) and not name.startswith("ceiling/")
               and not name.endswith("_noise")]
    return entries[:_MAX_EVAL_RESULTS]


def _eval_results(metrics: dict):
    from huggingface_hub import EvalResult

    dataset = metrics.get("dataset") if isinstance(metrics.get("dataset"), str) else None
    splits = ("train", "validation", "val", "test", "search", "proxy")
    results = []
    for name, value in _metric_entries(metrics):
        parts = name.split("/")
        split = parts[0] if len(parts) > 1 and parts[0].lower() in splits else None
        results.append(EvalResult(
            task_type="text-to-image",
            dataset_type=dataset or "custom",
            dataset_name=dataset or "fine-tuning data (not published)",
            dataset_split=split,
            metric_type=parts[-1].lower(),
            metric_name=name,
            metric_value=value,
        ))
    return results


def _trainable_parameters(weights: str | None, metrics: dict) -> int | None:
    if weights is not None:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            return int(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()))  # noqa: SIM118
    for key in ("trainable_params", "trainable_parameters"):
        if isinstance(metrics.get(key), int):
            return int(metrics[key])
    return None


def base_model_name(pretrained_model_name_or_path: str | None) -> str:
    """The base model a run records: its `--pretrained_model_name_or_path`, or TINY_BASE_NAME for the shipped base."""
    return pretrained_model_name_or_path or TINY_BASE_NAME


def recorded_base_model(output_dir: str) -> str | None:
    """The base model recorded in a run's outputs (`summary.json` `base_model`, else `training_config.json`), or in
    its trial / final runs for a search folder; None when nothing records it."""
    summary = os.path.join(output_dir, SUMMARY_FILE)
    if os.path.isfile(summary):
        data = read_json(summary)
        if isinstance(data, dict) and isinstance(data.get("base_model"), str):
            return data["base_model"]
    configs = [os.path.join(output_dir, TRAINING_CONFIG_FILE)]
    for runs in ("final", "trials"):  # a search folder: every run of it fine-tunes the same base
        folder = os.path.join(output_dir, runs)
        if os.path.isdir(folder):
            configs += [os.path.join(folder, d, TRAINING_CONFIG_FILE) for d in sorted(os.listdir(folder))]
    for path in configs:
        if os.path.isfile(path):
            run = read_json(path).get("run", {})
            if "pretrained_model_name_or_path" in run:
                return base_model_name(run["pretrained_model_name_or_path"])
    return None


def _base_model(explicit: str | None, adapter_config: dict) -> dict:
    """How the card names the base model: `hub_id` (the card's `base_model:` metadata), `tiny_base`, `local` (the
    folder's name only: a local path would leak the publisher's file system layout) or nothing known."""
    candidate = explicit or adapter_config.get("base_model_name_or_path")
    if candidate == TINY_BASE_NAME:
        return {"name": TINY_BASE_NAME, "tiny_base": True}
    if candidate and HUB_ID.match(candidate) and not os.path.exists(candidate):
        return {"name": candidate, "hub_id": candidate}
    if candidate:
        return {"name": os.path.basename(os.path.normpath(candidate)), "local": True}
    return {}


def render_card(
    repo_id: str,
    mask: Mask,
    *,
    adapter_config: dict | None = None,
    weights_path: str | None = None,
    metrics: dict | None = None,
    base_model: str | None = None,
    has_pareto: bool = False,
    include_samples: bool = False,
    has_pipeline: bool = False,
):
    """Render the MemControl model card (a `huggingface_hub.ModelCard`) from `hub_cards/memcontrol_card.md`
    (`has_pipeline`: the repository holds a full fine-tune as a diffusers pipeline)."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter_config = adapter_config or {}
    metrics = metrics or {}
    base = _base_model(base_model, adapter_config)
    hub_base = base.get("hub_id")
    trainable = _trainable_parameters(weights_path, metrics)
    has_adapter = weights_path is not None
    scope = adapter_config.get("mask_scope", "reference")
    tags = ["diffusers", "memcontrol", mask.method, "peft", "text-to-image", "stable-diffusion"]
    if not (has_adapter or has_pipeline):
        tags.append("memcontrol-mask")
    memcontrol_meta = {
        "method": mask.method,
        "layout": mask.layout,
        "scope": scope,
        "positions": list(mask.positions),
        "bits": list(mask.bits),
        "bitstring": mask.bitstring,
        "has_adapter": has_adapter,
        "has_pipeline": has_pipeline,
    }
    if base:
        memcontrol_meta["base_model"] = base["name"]
    if trainable is not None:
        memcontrol_meta["trainable_parameters"] = trainable
    model_name = repo_id.split("/")[-1]
    eval_results = _eval_results(metrics) or None
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        base_model=hub_base,
        model_name=model_name,
        eval_results=eval_results,
        memcontrol=memcontrol_meta,
    )
    return ModelCard.from_template(
        card_data,
        template_path=card_template_path(),
        model_name=model_name,
        repo_id=repo_id,
        method=mask.method,
        layout=mask.layout,
        scope=scope,
        bitstring=mask.bitstring,
        n_positions=len(mask),
        n_active=sum(mask.bits),
        mask_rows=list(zip(mask.positions, mask.bits)),
        metric_rows=[(name, f"{value:.6g}") for name, value in _metric_entries(metrics)],
        trainable_parameters=trainable,
        has_adapter=has_adapter,
        has_pipeline=has_pipeline,
        has_pareto=has_pareto,
        has_metrics=bool(metrics),
        include_samples=include_samples,
        base_model=hub_base,
        base=base,
    )

def _count(report: dict[str, Any] | None, key: str) -> Any:
    """A count of an audit report, '—' where it has none (no base; an audit written before the count existed)."""
    value = (report or {}).get(key)
    return "—" if value is None else value


def audit_card_section(report: dict[str, Any]) -> str:
    """The model card's audit section: the figures only, never an image, a row or a caption."""
    base = report.get("base") or {}
    detection = report.get("detection") or {}
    lines = ["", "## Memorization audit (`memcontrol audit`)", "",
             "| | This model | Base |", "|---|---|---|",
             (f"| Extracted images (calibrated) | {report['extracted_images']} | "
              f"{base.get('extracted_images', '—')} |"),
             f"| Copies (nearest-neighbour) | {_count(report, 'copied_images')} | {_count(base, 'copied_images')} |",
             (f"| Memorized prompts (base-only cliques subtracted) | {report['memorized_prompts']} | "
             f"{base.get('memorized_prompts', '—')} |"), "",
             (f"{report['attacked_prompts']} prompts attacked ({PROMPT_SOURCES[report['prompts']]}), "
             f"{report['generations_per_prompt']} generations each.")]
    if "auc" in detection:
        lines.append(f"Detection AUC (Wen et al., first step): {detection['auc']:.3f}.")
    return "\n".join(lines) + "\n"
