"""An independent judge of digits-domain generations (a benchmark tool, not a package metric).

Two logistic-regression classifiers on pixels of images *as the tiny base's VAE renders them* (encode + decode):

* in-domain: the digits train split against Fashion-MNIST (the tiny base's pretraining domain);
* prompt fidelity: the ten digit classes, on the digits train split.

Both are fitted on the train split and checked on held-out images (the digits test split, Fashion-MNIST's test
split): the ceiling any fine-tune of this pipeline can reach. Generations are scored by the share of images judged
digits (``in_domain``) and the share showing the prompted digit (``prompt_fidelity``).

Usage::

    python benchmarks/judge.py RUN_DIR [RUN_DIR ...] [--per_class 10] [--steps 20] [--json out.json]

A RUN_DIR is a trainer output folder (a MemControl adapter, a full UNet under ``unet/``, or nothing trained:
Freeze) or a folder of generations named ``<digit word>_<anything>.png`` (``seven_03.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

from diffusers_memcontrol.data.tiny_base import DOMAINS, images_to_tensor, load_domain_arrays, tiny_base_path

DIGIT_WORDS = DOMAINS["digits"].labels
FASHION_IMAGES = 4000  # Fashion-MNIST train images in the in-domain classifier's training set (digits: 1,437)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(os.path.join(tiny_base_path(), "vae")).eval()


@torch.no_grad()
def round_trip(images: np.ndarray, vae=None, batch: int = 500) -> np.ndarray:
    """uint8 [N, 32, 32] -> [N, 1024] float pixels in [0, 1] after the tiny base's VAE encode + decode."""
    vae = vae or _vae()
    out = []
    for start in range(0, len(images), batch):
        x = images_to_tensor(images[start:start + batch])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(y.clamp(-1, 1).add(1).div(2).mean(1).flatten(1).numpy())
    return np.concatenate(out)


def _features(pixels: np.ndarray) -> np.ndarray:
    """[N, 1024] float pixels in [0, 1] (already rendered) -> classifier features."""
    return pixels.reshape(len(pixels), -1).astype(np.float64)


class Judge:
    """The two classifiers, fitted on VAE round trips; `score` rates generated images of known prompted classes."""

    def __init__(self, seed: int = 0, cache: str | None = None):
        from sklearn.linear_model import LogisticRegression

        cache = cache or os.path.join(tempfile.gettempdir(), f"memcontrol-judge-{seed}.npz")
        if os.path.isfile(cache):  # plain arrays (no pickle): the fitted coefficients and the ceiling
            saved = np.load(cache)
            self.domain, self.classes = LogisticRegression(), LogisticRegression()
            for name, model in (("domain", self.domain), ("classes", self.classes)):
                model.coef_, model.intercept_ = saved[f"{name}_coef"], saved[f"{name}_intercept"]
                model.classes_ = saved[f"{name}_classes"]
            self.ceiling = json.loads(str(saved["ceiling"]))
            return
        vae = _vae()
        rng = np.random.default_rng(seed)
        digits, labels = load_domain_arrays("digits", "train")
        fashion, _ = load_domain_arrays("fashion-mnist", "train")
        fashion = fashion[rng.choice(len(fashion), FASHION_IMAGES, replace=False)]
        d, f = _features(round_trip(digits, vae)), _features(round_trip(fashion, vae))
        self.domain = LogisticRegression(max_iter=2000, C=1.0).fit(
            np.concatenate([d, f]), np.r_[np.ones(len(d)), np.zeros(len(f))])
        self.classes = LogisticRegression(max_iter=2000, C=0.1).fit(d, labels)
        test_digits, test_labels = load_domain_arrays("digits", "test")
        test_fashion, _ = load_domain_arrays("fashion-mnist", "test")
        td, tf = _features(round_trip(test_digits, vae)), _features(round_trip(test_fashion[:2000], vae))
        self.ceiling = {
            "in_domain_digits_test": float(self.domain.predict(td).mean()),
            "in_domain_fashion_test": float(self.domain.predict(tf).mean()),
            "class_accuracy_digits_test": float((self.classes.predict(td) == test_labels).mean()),
        }
        np.savez(cache, ceiling=json.dumps(self.ceiling),
                 **{f"{name}_{part}": getattr(model, f"{part}_") for name, model in
                    (("domain", self.domain), ("classes", self.classes)) for part in ("coef", "intercept", "classes")})

    def score(self, pixels: np.ndarray, prompted: np.ndarray) -> dict:
        """Rate generations ([N, 1024] or [N, 32, 32] pixels in [0, 1]) prompted with digit classes `prompted`."""
        x = _features(np.asarray(pixels))
        in_domain = self.domain.predict(x).astype(bool)
        right = self.classes.predict(x) == np.asarray(prompted)
        return {"n": len(x), "in_domain": float(in_domain.mean()), "prompt_fidelity": float(right.mean()),
                "prompt_fidelity_in_domain": float(right[in_domain].mean()) if in_domain.any() else 0.0}


@torch.no_grad()
def generate(run_dir: str | None, per_class: int = 10, steps: int = 20, guidance: float = 4.0,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each digit prompt from the tiny base with `run_dir`'s fine-tune (None: the base)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    import diffusers_memcontrol  # noqa: F401  (registers the adapter type and the pipeline loader)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_path(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if run_dir is not None:
        if os.path.isfile(os.path.join(run_dir, "unet", "config.json")):
            pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(run_dir, "unet")).eval()
        elif os.path.isfile(os.path.join(run_dir, "adapter_config.json")):
            pipe.load_memcontrol_adapter(run_dir, fuse=True, local_files_only=True)
    prompts = [c for c in DOMAINS["digits"].captions for _ in range(per_class)]
    labels = np.repeat(np.arange(len(DIGIT_WORDS)), per_class)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(seed)).images
    return out.mean(-1).reshape(len(out), -1), labels


def read_folder(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Generations named `<digit word>_*.png` in `folder` -> ([N, 1024] pixels in [0, 1], prompted classes)."""
    from PIL import Image

    pixels, labels = [], []
    for name in sorted(os.listdir(folder)):
        word = name.split("_")[0]
        if name.endswith(".png") and word in DIGIT_WORDS:
            image = Image.open(os.path.join(folder, name)).convert("L").resize((32, 32), Image.BILINEAR)
            pixels.append(np.asarray(image, dtype=np.float64).reshape(-1) / 255.0)
            labels.append(DIGIT_WORDS.index(word))
    if not pixels:
        raise SystemExit(f"error: {folder!r} holds no generation named '<digit word>_*.png'.")
    return np.stack(pixels), np.asarray(labels)


def judge_run(judge: Judge, run_dir: str | None, **kwargs) -> dict:
    """Score a trainer output folder (generated here), a folder of PNG generations, or the base (None)."""
    if run_dir is not None and any(n.endswith(".png") and n.split("_")[0] in DIGIT_WORDS for n in os.listdir(run_dir)):
        pixels, labels = read_folder(run_dir)
    else:
        pixels, labels = generate(run_dir, **kwargs)
    return judge.score(pixels, labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="Trainer output folders or folders of generations ('base': the base).")
    p.add_argument("--per_class", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None, help="Write the scores here.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    judge = Judge()
    result = {"ceiling": judge.ceiling, "runs": {}}
    print(json.dumps(judge.ceiling))
    for run in args.runs:
        result["runs"][run] = judge_run(judge, None if run == "base" else run, per_class=args.per_class,
                                        steps=args.steps)
        print(run, json.dumps(result["runs"][run]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
