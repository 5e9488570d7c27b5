"""Fit the tiny base's quality classifiers on images as its VAE renders them (encode + decode).

A fine-tune of a latent pipeline can only output what its VAE decodes, so the classifiers that judge its generations
are fitted on VAE round trips, never on a test split:

1. The agreement classifier: the head (last linear layer) of the shipped ``DomainEncoder`` is refitted, by a
   multinomial logistic regression on the encoder's (unchanged) features of the digits *train* split's VAE round
   trips. The feature space of FID/KID/AMD does not change.
2. One in-domain classifier per built-in target domain (``digits``, ``animal-mnist``) against the base's
   pretraining domain (Fashion-MNIST): a logistic regression on grayscale pixels of the VAE round trips of both
   *train* splits (Fashion-MNIST: a seeded subset), written to ``assets/tiny_base/in_domain/<domain>.safetensors``.

Reports (``quality_classifiers.json`` next to them) the accuracy/in-domain rate on held-out *test* images through
the VAE: the ceiling a fine-tune can reach. Deterministic (sklearn's lbfgs solver, fixed seeds). Run again whenever
the tiny base's VAE or domain encoder is retrained::

    python training/fit_quality_classifiers.py                 # writes into the package's tiny_base assets
    python training/fit_quality_classifiers.py --model /tmp/tb # another tiny base folder
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.files import write_json_atomic
from diffusers_memcontrol.metrics.agreement import classifier_agreement
from diffusers_memcontrol.metrics.extraction import vae_round_trip
from diffusers_memcontrol.metrics.fid import encoder_identity
from diffusers_memcontrol.metrics.in_domain import fit_in_domain_classifier, in_domain_rate

TARGET_DOMAINS = ("digits", "animal-mnist")
BASE_DOMAIN = "fashion-mnist"


def round_trips(vae, domain: str, split: str, limit: int | None, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """VAE round trips of a (seeded, sorted) subset of a domain split, with their labels."""
    images, labels = tb.load_domain_arrays(domain, split)
    if limit is not None and limit < len(images):
        rows = np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))
        images, labels = images[rows], labels[rows]
    return vae_round_trip(vae, tb.images_to_tensor(images), batch_size=256), labels


def refit_head(encoder: tb.DomainEncoder, images: torch.Tensor, labels: np.ndarray, seed: int) -> None:
    """Replace ``encoder.head`` by a logistic regression on its features of ``images``."""
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        feats = torch.cat([encoder.features(images[i:i + 256]) for i in range(0, len(images), 256)]).double().numpy()
    model = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(feats, labels)
    with torch.no_grad():
        encoder.head.weight.copy_(torch.from_numpy(model.coef_))
        encoder.head.bias.copy_(torch.from_numpy(model.intercept_))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=tb.tiny_base_path(), help="Tiny base folder (reads vae/, writes "
                                                                 "domain_encoder/ and in_domain/ into it).")
    p.add_argument("--base_images", type=int, default=4000, help="Fashion-MNIST train images per classifier.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_head", action="store_true", help="Keep the domain encoder's head as it is.")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae")).eval()
    report: dict = {"vae": encoder_identity(vae), "seed": args.seed, "base_domain": BASE_DOMAIN}
    base_train, _ = round_trips(vae, BASE_DOMAIN, "train", args.base_images, args.seed)
    base_test, _ = round_trips(vae, BASE_DOMAIN, "test", 2000, args.seed)

    encoder_dir = os.path.join(args.model, "domain_encoder")
    encoder = tb.load_domain_encoder(encoder_dir)
    digits_train, digits_train_labels = round_trips(vae, "digits", "train", None, args.seed)
    digits_test, digits_test_labels = round_trips(vae, "digits", "test", None, args.seed)
    raw_test, _ = tb.load_domain_arrays("digits", "test")
    before = classifier_agreement(digits_test, digits_test_labels, encoder)
    if not args.skip_head:
        refit_head(encoder, digits_train, digits_train_labels, args.seed)
        encoder.save_pretrained(encoder_dir, safe_serialization=True)
        config_path = os.path.join(encoder_dir, "config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config.pop("_name_or_path", None)  # a local path: not part of the shipped asset
        write_json_atomic(config_path, config, sort_keys=True)
    report["agreement_classifier"] = {
        "refitted_on": "VAE round trips of the digits train split", "head_refitted": not args.skip_head,
        "test_accuracy_through_vae_before": round(before, 4),
        "test_accuracy_through_vae": round(classifier_agreement(digits_test, digits_test_labels, encoder), 4),
        "test_accuracy_raw": round(classifier_agreement(tb.images_to_tensor(raw_test), digits_test_labels,
                                                        encoder), 4)}

    report["in_domain"] = {}
    for domain in TARGET_DOMAINS:
        try:
            target_train, _ = round_trips(vae, domain, "train", None, args.seed)
            target_test = digits_test if domain == "digits" else round_trips(vae, domain, "test", None, args.seed)[0]
        except (ImportError, FileNotFoundError) as err:
            print(f"skipping {domain}: {err}")
            continue
        info = {"target_domain": domain, "base_domain": BASE_DOMAIN, "vae": report["vae"],
                "trained_on": f"VAE round trips of the {domain} train split and {len(base_train)} {BASE_DOMAIN} "
                              "train images"}
        classifier = fit_in_domain_classifier(target_train, base_train, seed=args.seed, info=info)
        classifier.save(os.path.join(args.model, "in_domain", f"{domain}.safetensors"))
        report["in_domain"][domain] = {
            "target_test_through_vae": round(in_domain_rate(target_test, classifier), 4),
            "base_test_through_vae": round(in_domain_rate(base_test, classifier), 4),
            "target_train_through_vae": round(in_domain_rate(target_train, classifier), 4)}
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(os.path.join(args.model, "in_domain", "quality_classifiers.json"), report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
