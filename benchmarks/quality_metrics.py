"""Every quality metric on image sets of known quality: the ceiling, the floor and a wrong-domain set.

Scores, against the real digits test split (the quickstart's stage-2 FID reference), with the stage-2 evaluation's
settings (tiny-domain features, classifier agreement, the digits in-domain classifier):

* ``ceiling``: real digits test images through the tiny base's VAE (the best any fine-tune can reach);
* ``freeze``: the tiny base's own generations for the digits test captions (the floor);
* ``fashion``: Fashion-MNIST test images through the VAE (a model that draws the base's own domain), labelled
  with random digit classes.

Each set holds ``--n`` images (digits test has 360). Writes benchmarks/results/quality_metrics.json and .md::

    python benchmarks/quality_metrics.py                  # n=200, 20 sampling steps (the quickstart's)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

SETS = ("ceiling", "freeze", "fashion")
COLUMNS = ("fid", "kid", "c2st_accuracy", "agreement", "in_domain")


def image_sets(n: int, steps: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """The three image sets with their digit labels."""
    from diffusers import StableDiffusionPipeline

    from diffusers_memcontrol.data import tiny_base as tb
    from diffusers_memcontrol.evaluation.evaluator import generate_images
    from diffusers_memcontrol.metrics.extraction import vae_round_trip

    pipe = StableDiffusionPipeline.from_pretrained(tb.tiny_base_path(), safety_checker=None)
    rng = np.random.default_rng(seed)
    digits, digit_labels = tb.load_domain_arrays("digits", "test")
    rows = np.sort(rng.choice(len(digits), min(n, len(digits)), replace=False))
    fashion, _ = tb.load_domain_arrays("fashion-mnist", "test")
    fashion = fashion[np.sort(rng.choice(len(fashion), n, replace=False))]
    labels = [int(v) for v in digit_labels[rows]]
    prompts = [tb.DOMAINS["digits"].caption(v) for v in labels]
    freeze = generate_images(pipe, prompts, 1, num_inference_steps=steps, guidance_scale=4.0, seed=seed,
                             show_progress=False)
    return {"ceiling": (vae_round_trip(pipe.vae, tb.images_to_tensor(digits[rows])), labels),
            "freeze": (freeze, labels),
            "fashion": (vae_round_trip(pipe.vae, tb.images_to_tensor(fashion)),
                        [int(v) for v in rng.integers(0, 10, n)])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    from diffusers_memcontrol.data import tiny_base as tb
    from diffusers_memcontrol.evaluation.evaluator import EvaluationConfig, score_images
    from diffusers_memcontrol.files import write_json_atomic, write_text_atomic

    start = time.perf_counter()
    sets = image_sets(args.n, args.steps)
    test = tb.load_domain("digits", "test")
    with tempfile.TemporaryDirectory() as cache:
        config = EvaluationConfig(in_domain_classifier="digits", cache_dir=cache, show_progress=False)
        scores = {name: score_images(images, test, config, labels=labels) for name, (images, labels) in sets.items()}
    record = {"n": args.n, "steps": args.steps, "reference": "digits test split (360 real images)",
              "seconds": round(time.perf_counter() - start, 1), "scores": scores}
    os.makedirs(args.results, exist_ok=True)
    write_json_atomic(os.path.join(args.results, "quality_metrics.json"), record)
    lines = [f"| Image set (n={args.n}) | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name in SETS:
        cells = [f"{scores[name][c]:.4g} ± {scores[name][c + '_noise']:.2g}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n\n(± : the metric's noise, |half A - half B|.)\n"
    write_text_atomic(os.path.join(args.results, "quality_metrics.md"), table)
    print(table)
    return record


if __name__ == "__main__":
    main()
