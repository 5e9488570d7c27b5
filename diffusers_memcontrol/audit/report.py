"""The audit's report format: `audit.json`'s keys read back into `audit.md` (the model card's section: `hub.card`).

Figures only: never an image, a training row or a caption (`docs/audit.md`).
"""

from __future__ import annotations

from typing import Any

from ..hub.card import PROMPT_SOURCES, _count


def _copies_line(copies: dict[str, Any] | None) -> str:
    """How the nearest-neighbour copies were counted (numbers only)."""
    if not copies:
        return ""
    bound = (copies.get("bounds") or {}).get("median")
    classes = (f"same-class (column `{copies['class_column']}`)" if copies.get("classes")
               else "any (no class column)")
    return (f"Copies: generations nearest to their own training image among the training split's VAE round trips, "
            f"closer than the {copies['percentile']:g}th percentile of {classes} nearest-neighbour distances over "
            f"{copies['n_calibration_images']} training images (median bound "
            f"{'—' if bound is None else f'{bound:.4g}'}).")


def render_report(report: dict[str, Any]) -> str:
    """audit.md: one page, numbers only (captions only when the audit ran with --include_prompts)."""
    base = report.get("base")
    dmem_size = report["dmem_size"] if report["dmem_size"] is not None else "unknown"
    verdict = ("**Training images were extracted.** Do not publish this model as is." if report["extracted_images"]
               else "No training image was extracted by this attack.")
    copied = report.get("copied_images")
    if copied:
        verdict += (f" {copied} attacked prompt(s) generated a nearest-neighbour copy of their training image "
                    "(closer to it than to any other training image, and than same-class images usually are).")
    lines = [
        "# Memorization audit", "",
        f"Model: `{report['model']['path']}` ({report['model']['kind']}); base: `{report['model']['base_model']}`.",
        "", verdict, "",
        "| | Fine-tune | Base |", "|---|---|---|",
        (f"| Extracted images (calibrated) | {report['extracted_images']} | "
         f"{base['extracted_images'] if base else '—'} |"),
        f"| Copies (nearest-neighbour) | {_count(report, 'copied_images')} | {_count(base, 'copied_images')} |",
        (f"| Memorized prompts (cliques) | {report['memorized_prompts_before_base_subtraction']} | "
        f"{base['memorized_prompts'] if base else '—'} |"),
        f"| Memorized prompts, base-only cliques subtracted | {report['memorized_prompts']} | |", "",
        (f"Attacked prompts: {report['attacked_prompts']} ({PROMPT_SOURCES[report['prompts']]}), "
         f"{report['generations_per_prompt']} generations each; D_mem size: {dmem_size}."),
    ]
    detection = report.get("detection")
    if detection:
        lines += ["", (f"Scan: {detection['n_scanned']} distinct training captions ranked by Wen et al.'s first-step "
                      f"detection score (median {detection['scores']['median']:.4g}, max "
                      f"{detection['scores']['max']:.4g}); the top {detection['top_k']} were attacked.")]
        if "auc" in detection:
            base_auc = (base or {}).get("detection") or {}
            lines.append(f"Detection AUC against the known D_mem: {detection['auc']:.3f} (TPR at 1% FPR "
                         f"{detection['tpr_at_1pct_fpr']:.3f}); D_mem in the top {detection['top_k']}: "
                         f"{detection['dmem_in_top_k']}" + (f"; the base's AUC: {base_auc['auc']:.3f}"
                                                            if base_auc else "") + ".")
    flagged = [p for p in report["per_prompt"] if p["clique"] or p["extracted"] or p.get("copied")]
    if flagged:
        lines += ["", "| Training row | Extracted | Copy | Clique | Base clique | Detection score |" +
                  (" Caption |" if report["settings"].get("include_prompts") else ""),
                  "|---|---|---|---|---|---|" + ("---|" if report["settings"].get("include_prompts") else "")]
        for p in flagged:
            score = f"{p['detection_score']:.4g}" if "detection_score" in p else "—"
            lines.append(f"| {p['row']} | {'yes' if p['extracted'] else 'no'} | "
                         f"{'yes' if p.get('copied') else 'no'} | {'yes' if p['clique'] else 'no'} | "
                         f"{'yes' if p['base_clique'] else 'no'} | {score} |" +
                         (f" {p.get('caption', '')} |" if report["settings"].get("include_prompts") else ""))
    median = (report["extraction"].get("thresholds") or {}).get("median")
    attack = report["settings"]["attack"]
    lines += ["", (f"Attack: Carlini et al.'s cliques (>= {attack['extraction_min_clique_size']} "
                  f"generations, tiled l2 < {attack['extraction_threshold']}) matched to the "
                  f"training image as the VAE renders it (median match threshold "
                  f"{'—' if median is None else f'{median:.4g}'}); rows index the training split."),
              _copies_line(report.get("copies")),
              "`memorization.png` (local only, never published) shows training images next to generations.", ""]
    return "\n".join(lines)

