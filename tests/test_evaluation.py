"""`evaluate` / `evaluate_search_objectives` on a tiny randomly initialised pipeline with the tiny base's shapes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.data.datasets import build_memorization_set
from diffusers_memcontrol.evaluation.evaluator import (
    EvaluationConfig,
    evaluate,
    evaluate_search_objectives,
    generate_images,
    write_metrics,
)
from diffusers_memcontrol.metrics.encoders import DomainModelEncoder

TOP_KEYS = {"fid", "amd", "amd_eval", "agreement", "extracted_images", "memorized_prompts", "dmem", "dmem_mean",
            "trainable_params", "replication", "copied_images"}


def make_pipeline() -> StableDiffusionPipeline:
    """The tiny base's architecture (32 px, 8x8 latents), random weights, DDIM sampling."""
    return StableDiffusionPipeline(
        vae=tb.build_vae(), text_encoder=tb.build_text_encoder(), tokenizer=tb.build_tokenizer(),
        unet=tb.build_unet(), scheduler=DDIMScheduler.from_config(tb.build_scheduler().config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_encoder() -> DomainModelEncoder:
    """A small random domain CNN as feature encoder and classifier (the shipped one may not exist yet)."""
    torch.manual_seed(0)
    encoder = DomainModelEncoder(tb.DomainEncoder(channels=(8, 16), feature_dim=16).eval())
    encoder.name = "test-domain"
    return encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    train = tb.load_domain("digits", "train").select(range(40))
    test = tb.load_domain("digits", "test").select(range(12))
    dmem = build_memorization_set(train, dmem_size=3, unique_captions=True, seed=0)
    config = EvaluationConfig(
        num_inference_steps=2, images_per_prompt=2, num_eval_prompts=4, extraction_generations=3,
        extraction_min_clique_size=2, dmem_batch_size=2, generation_batch_size=8, show_progress=False,
        cache_dir=str(tmp_path_factory.mktemp("eval-cache")), quality_images=8,
    )
    pipe, encoder = make_pipeline(), make_encoder()
    generations = str(tmp_path_factory.mktemp("run") / "dmem_generations.safetensors")
    first = evaluate(pipe, test, dmem, train, config, encoder=encoder, generations_path=generations)
    return {"pipe": pipe, "encoder": encoder, "train": train, "test": test, "dmem": dmem, "config": config,
            "first": first, "generations": generations}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_evaluate_returns_all_keys_with_finite_values(setup):
    metrics = setup["first"]
    assert TOP_KEYS <= set(metrics)
    for key in TOP_KEYS - {"replication"}:
        assert _finite(metrics[key]), (key, metrics[key])
    assert all(_finite(metrics["replication"][k]) for k in ("mean", "p95", "fraction_above"))
    assert metrics["fid"] >= 0 and 0 <= metrics["amd"] <= 2 and 0 <= metrics["agreement"] <= 1
    assert metrics["dmem"] >= metrics["dmem_mean"] > 0
    assert metrics["trainable_params"] == sum(p.numel() for p in setup["pipe"].unet.parameters())
    assert (metrics["num_eval_images"], metrics["num_dmem"], metrics["num_fid_reference_images"]) == (8, 3, 12)
    assert metrics["extraction"]["n_prompts"] == 3 and metrics["extracted_images"] >= 0
    assert metrics["fid_reference_cached"] is False
    assert metrics["memorized_prompts"] == metrics["extraction"]["n_flagged_prompts"] >= metrics["extracted_images"]
    for key in ("vae_round_trip", "nearest_other", "thresholds"):
        spread = metrics["extraction"][key]
        assert 0 <= spread["min"] <= spread["median"] <= spread["max"], (key, spread)
    assert metrics["extraction"]["thresholds"]["max"] <= metrics["extraction"]["pixel_threshold"]
    assert metrics["replication_space"] == {"encoder": "test-domain", "round_trip": True}


def test_dmem_generations_are_kept_for_the_figure(setup):
    from diffusers_memcontrol.evaluation.figures import load_dmem_generations

    saved = load_dmem_generations(setup["generations"])
    assert saved["generations"].shape == (3, 3, 3, 32, 32) and saved["generations"].dtype == torch.uint8
    assert saved["training_images"].shape == (3, 3, 32, 32) and saved["flags"].shape == (3, 3)
    assert int((saved["flags"] & 2).bool().any(1).sum()) == setup["first"]["extracted_images"]
    assert int((saved["flags"] & 4).bool().any(1).sum()) == setup["first"]["copied_images"]


def test_evaluate_counts_planted_nearest_neighbour_copies(setup, monkeypatch, tmp_path):
    """Through evaluate(): prompt 0 generates its decoded training image (a copy), prompt 1 prompt 0's image and
    prompt 2 a classmate's decoded image (neither is a copy); the classes come from the digits' label column."""
    from diffusers_memcontrol.data.images import pixel_batch
    from diffusers_memcontrol.evaluation import evaluator as evaluation
    from diffusers_memcontrol.evaluation.figures import load_dmem_generations
    from diffusers_memcontrol.metrics.extraction import vae_round_trip

    train, dmem, pipe = setup["train"], setup["dmem"], setup["pipe"]
    rows = dmem["dmem_index"]
    mate = next(j for j in range(len(train)) if train[j]["label"] == train[rows[2]]["label"] and j not in rows)
    trips = vae_round_trip(pipe.vae, pixel_batch([*dmem["image"][:1], train[mate]["image"]], 32))
    planted = torch.stack([trips[0], trips[0], trips[1]])[:, None].expand(-1, 3, -1, -1, -1)
    monkeypatch.setattr(evaluation, "_dmem_generations", lambda *args: planted.clone())
    path = tmp_path / "dmem_generations.safetensors"
    metrics = evaluate(pipe, setup["test"], dmem, train, setup["config"], encoder=setup["encoder"],
                       generations_path=str(path))
    copies = metrics["copies"]
    assert metrics["copied_images"] == copies["n_copied"] == 1 and copies["n_copy_generations"] == 3
    assert copies["class_column"] == "label" and copies["classes"] and copies["n_calibration_images"] == len(train)
    assert metrics["memorized_prompts"] == 3  # every prompt's generations are one image: a clique
    assert (load_dmem_generations(path)["flags"] & 4).bool().any(1).tolist() == [True, False, False]


def test_reference_statistics_are_cached_and_reused(setup):
    cache = setup["config"].cache_dir
    files = sorted(os.listdir(cache))
    assert files and not [f for f in files if f.endswith(".tmp")]
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}
    calls = []
    encoder = setup["encoder"]
    original = encoder.features

    def counting(images, batch_size=None):
        calls.append(images.shape[0])
        return original(images, batch_size=batch_size)

    encoder.features = counting
    try:
        second = evaluate(setup["pipe"], setup["test"], setup["dmem"], setup["train"], setup["config"],
                          encoder=encoder, trainable_params=123)
    finally:
        del encoder.features
    assert second["fid_reference_cached"] is True and second["train_features_cached"] is True
    assert sorted(os.listdir(cache)) == files
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes
    # only generated images were encoded: 8 eval + 9 D_mem generations, never the 12 + 40 real images
    assert sum(calls) == 8 + 9
    assert second["trainable_params"] == 123
    # same seeds, same generations: same numbers
    for key in ("fid", "amd", "amd_eval", "dmem", "dmem_mean", "agreement"):
        assert second[key] == pytest.approx(setup["first"][key], rel=1e-5, abs=1e-6)


def test_no_prompt_text_in_the_json_output(setup, tmp_path):
    path = write_metrics(setup["first"], tmp_path / "out" / "metrics.json")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert json.loads(text)["fid"] == pytest.approx(setup["first"]["fid"])
    captions = list(setup["test"]["text"]) + list(setup["dmem"]["text"]) + list(setup["train"]["text"])
    for caption in set(captions):
        assert caption not in text
    for word in {c.split()[-1] for c in setup["dmem"]["text"]} | {"handwritten", "digit"}:
        assert word not in text


def test_search_objectives(setup):
    config = EvaluationConfig.for_search(num_eval_prompts=4, num_inference_steps=2, dmem_batch_size=2,
                                         cache_dir=setup["config"].cache_dir)
    out = evaluate_search_objectives(setup["pipe"], setup["dmem"], setup["test"], config, encoder=setup["encoder"])
    assert {"dmem", "fid", "kid", "quality_objective", "memorization_objective"} <= set(out)
    assert all(_finite(out[k]) for k in ("dmem", "fid", "kid", "quality_objective", "memorization_objective"))
    assert out["quality_metric"] == "fid" and out["quality_objective"] == out["fid"] and out["agreement"] is None
    assert out["memorization_metric"] == "dmem" and out["memorization_objective"] == out["dmem"]
    assert out["quality_objective_se"] is None  # FID has no per-prompt standard error
    config = EvaluationConfig.for_search(num_eval_prompts=4, num_inference_steps=2, dmem_batch_size=2,
                                         cache_dir=setup["config"].cache_dir, search_objective="agreement")
    out = evaluate_search_objectives(setup["pipe"], setup["dmem"], setup["test"], config, encoder=setup["encoder"])
    a = out["agreement"]
    assert out["quality_objective"] == 1 - a and out["quality_objective_se"] == pytest.approx((a * (1 - a) / 4) ** 0.5)
    assert out["dmem"] == pytest.approx(setup["first"]["dmem"], rel=1e-5)  # same D_mem, seed and batch size


def test_generation_does_not_depend_on_batch_size(setup):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 4.0, "seed": 3, "show_progress": False}
    a = generate_images(setup["pipe"], ["one", "two"], 2, batch_size=1, **kwargs)
    b = generate_images(setup["pipe"], ["one", "two"], 2, batch_size=4, **kwargs)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not hasattr(setup["pipe"], "_progress_bar_config") or setup["pipe"]._progress_bar_config == {}


def test_config_json_round_trip_and_validation():
    config = EvaluationConfig(feature_encoder="xrv-densenet121", agreement="biovil", num_eval_prompts=None,
                              dmem_timesteps=[100, 500], cache_dir="/tmp/x")
    assert EvaluationConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="agreement must be one of"):
        EvaluationConfig(agreement="bleu")
    with pytest.raises(ValueError, match="extraction_generations=2 is below extraction_min_clique_size=3"):
        EvaluationConfig(extraction_generations=2)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        EvaluationConfig(num_inference_steps=0)
    with pytest.raises(ValueError, match=r"Unknown EvaluationConfig field\(s\) \['steps'\]"):
        EvaluationConfig.from_dict({"steps": 3})


def test_bad_inputs_are_named(setup):
    pipe, config = setup["pipe"], setup["config"]
    with pytest.raises(ValueError, match=r"\['report'\] not found in eval_dataset; available columns"):
        evaluate(pipe, setup["test"], setup["dmem"], setup["train"], config, caption_column="report",
                 encoder=setup["encoder"])
    no_labels = setup["test"].remove_columns("label")
    with pytest.raises(ValueError, match="agreement='classifier' needs class labels"):
        evaluate(pipe, no_labels, setup["dmem"], setup["train"], config, encoder=setup["encoder"])
    with pytest.raises(ValueError, match=r"missing \['vae'\]"):
        evaluate(StableDiffusionPipeline(vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False),
                 setup["test"], setup["dmem"], setup["train"], config, encoder=setup["encoder"])
    with pytest.raises(TypeError, match="config must be an EvaluationConfig"):
        evaluate(pipe, setup["test"], setup["dmem"], setup["train"], {"fid": 1}, encoder=setup["encoder"])


def test_write_metrics_is_atomic_and_strict_json(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics({"fid": 1.5, "dmem": float("nan"), "n": torch.tensor(3), "per": [torch.tensor(0.5)]}, path)
    assert json.loads(path.read_text()) == {"fid": 1.5, "dmem": None, "n": 3, "per": [0.5]}
    with pytest.raises(TypeError, match="not JSON-serializable"):
        write_metrics({"fid": 2.0, "bad": object()}, path)
    assert json.loads(path.read_text())["fid"] == 1.5  # the previous file is intact
    assert os.listdir(tmp_path) == ["metrics.json"]


_BASE_READY = os.path.isfile(os.path.join(tb.tiny_base_path(), "model_index.json"))


@pytest.mark.slow  # about 5 minutes on 2 CPU cores; deselect with -m "not slow"
@pytest.mark.skipif(not _BASE_READY, reason="needs the shipped tiny base (diffusers_memcontrol/assets/tiny_base)")
def test_wen_detection_separates_duplicated_prompts_on_tiny_base(tmp_path):
    """After full fine-tuning on a duplicated D_mem, Wen's detection separates D_mem prompts from unseen ones."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "wen_detection.py")
    spec = importlib.util.spec_from_file_location("wen_detection_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        report = module.main(["--output", str(tmp_path / "wen_detection.json")])
    finally:
        torch.set_num_threads(threads)  # the benchmark runs single-threaded
    assert report["auc"] >= 0.9, report["after_fine_tuning"]
    assert report["before_fine_tuning"]["first_step"]["auc"] < report["auc"]


def _digits_extraction(make_generations):
    """The calibrated attack of evaluate() with the shipped tiny base's VAE on digits D_mem pairs."""
    from diffusers import AutoencoderKL

    from diffusers_memcontrol.data.images import pixel_batch
    from diffusers_memcontrol.metrics.extraction import calibrated_extraction, vae_round_trip

    train = tb.load_domain("digits", "train").select(range(300))
    dmem = build_memorization_set(train, dmem_size=6, seed=0)
    vae = AutoencoderKL.from_pretrained(os.path.join(tb.tiny_base_path(), "vae")).eval()
    images = pixel_batch(dmem["image"], 32)
    generations = make_generations(images, vae_round_trip(vae, images))
    generator = torch.Generator().manual_seed(0)
    generations = (generations + 0.003 * torch.randn(generations.shape, generator=generator)).clamp(-1, 1)
    config = EvaluationConfig()  # the evaluation's default thresholds
    references = (pixel_batch(train.select(range(s, s + 100))["image"], 32) for s in range(0, 300, 100))
    return calibrated_extraction(
        generations, images, lambda x: vae_round_trip(vae, x), references, threshold=config.extraction_threshold,
        pixel_threshold=config.extraction_threshold, separation=config.extraction_separation, min_clique_size=3)


def test_decoded_training_latents_are_all_extracted_on_tiny_base():
    """A generation that reproduces its training image as well as the VAE can counts as extracted."""
    extraction, flags = _digits_extraction(lambda images, trips: trips[:, None].expand(-1, 5, -1, -1, -1))
    assert extraction["vae_round_trip"]["min"] > extraction["pixel_threshold"]  # pixel matching alone: 0 extracted
    assert extraction["n_uncountable"] == 0
    assert extraction["n_extracted"] == extraction["n_flagged_prompts"] == 6
    assert extraction["n_extracted_generations"] == 30 and bool((flags == 3).all())


@pytest.mark.parametrize("decoded", [False, True])
def test_generations_of_other_training_images_are_not_extracted_on_tiny_base(decoded):
    """Each prompt's generations copy another D_mem pair's image (raw or VAE-decoded): a clique, never a match."""
    def others(images, trips):
        source = trips if decoded else images
        return source.roll(1, dims=0)[:, None].expand(-1, 5, -1, -1, -1)

    extraction, flags = _digits_extraction(others)
    assert extraction["n_flagged_prompts"] == 6 and extraction["n_extracted"] == 0
    assert bool((flags == 1).all())


def test_nearest_neighbour_copies_on_tiny_base():
    """On digits with the shipped VAE: decoded training latents (sampled) are copies; a classmate's decoded image and
    another prompt's image are not, although all of them form cliques."""
    from diffusers import AutoencoderKL

    from diffusers_memcontrol.data.images import pixel_batch
    from diffusers_memcontrol.metrics.extraction import nearest_neighbour_copies, vae_round_trip

    train = tb.load_domain("digits", "train").select(range(300))
    dmem = build_memorization_set(train, dmem_size=6, seed=0)
    vae = AutoencoderKL.from_pretrained(os.path.join(tb.tiny_base_path(), "vae")).eval()
    images = pixel_batch(dmem["image"], 32)
    labels = train["label"]
    classmates = [next(j for j in range(len(train)) if labels[j] == labels[r] and j != r) for r in dmem["dmem_index"]]
    with torch.no_grad():
        sampled = torch.stack([vae.decode(vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(s)))
                               .sample.clamp(-1, 1) for s in range(3)], 1)
    trips = vae_round_trip(vae, images)
    generations = torch.cat([sampled, vae_round_trip(vae, pixel_batch(train.select(classmates)["image"], 32))[:, None],
                             trips.roll(1, dims=0)[:, None]], 1)
    references = (pixel_batch(train.select(range(s, s + 100))["image"], 32) for s in range(0, 300, 100))
    summary, copies = nearest_neighbour_copies(generations, images, lambda x: vae_round_trip(vae, x), references,
                                               labels=dmem["label"], reference_labels=labels)
    assert copies[:, :3].all() and not copies[:, 3:].any()
    assert summary["n_copied"] == 6 and summary["n_copy_generations"] == 18 and summary["classes"]
    assert 0 < summary["bounds"]["min"] <= summary["bounds"]["max"] < summary["calibration_nearest"]["median"]


def test_pixel_replication_space_tells_a_copy_from_its_classmates_on_tiny_base():
    """Against the training set as the tiny VAE renders it, a decoded training latent is nearest to its own image in
    the pixel space (the copy-detection pair of tiny-domain) and more similar to it than to any classmate."""
    from diffusers import AutoencoderKL

    from diffusers_memcontrol.data.images import pixel_batch
    from diffusers_memcontrol.metrics.encoders import load_encoder, replication_encoder_name
    from diffusers_memcontrol.metrics.extraction import vae_round_trip

    train = tb.load_domain("digits", "train").select(range(200))
    vae = AutoencoderKL.from_pretrained(os.path.join(tb.tiny_base_path(), "vae")).eval()
    images = pixel_batch(train["image"], 32)
    trips = vae_round_trip(vae, images)
    with torch.no_grad():
        copies = vae.decode(vae.encode(images[:20]).latent_dist.sample(torch.Generator().manual_seed(0))).sample
    encoder = load_encoder(replication_encoder_name("tiny-domain"))
    train_feats = torch.nn.functional.normalize(encoder.features(trips), dim=1)
    copy_feats = torch.nn.functional.normalize(encoder.features(copies.clamp(-1, 1)), dim=1)
    similarity = copy_feats @ train_feats.T
    assert similarity.argmax(1).tolist() == list(range(20))
    labels = torch.tensor(train["label"])
    classmates = (train_feats[:20] @ train_feats.T).masked_fill(labels[:20, None] != labels[None], -1)
    classmates.fill_diagonal_(-1)
    assert bool((similarity.diagonal() > classmates.max(1).values).all())


def test_quality_metrics_noise_and_ceiling_are_reported(setup):
    metrics = setup["first"]
    assert _finite(metrics["kid"]) and _finite(metrics["fid_noise"]) and _finite(metrics["kid_noise"])
    assert 0 <= metrics["c2st_accuracy"] <= 1 and metrics["in_domain"] is None  # no in-domain classifier named
    ceiling = metrics["ceiling"]
    assert ceiling["num_images"] == metrics["num_eval_images"] == 8 and ceiling["cached"] is False
    assert all(_finite(ceiling[k]) for k in ("fid", "kid", "c2st_accuracy", "agreement"))
    assert metrics["quality_metric"] == "fid" and metrics["quality_objective"] == metrics["fid"]


def test_quality_images_raise_the_generations_per_prompt():
    from diffusers_memcontrol.evaluation.evaluator import _images_per_prompt

    assert _images_per_prompt(EvaluationConfig(num_eval_prompts=50), 50) == 4  # default quality_images=200
    assert _images_per_prompt(EvaluationConfig(quality_images=None, images_per_prompt=3), 50) == 3
    assert _images_per_prompt(EvaluationConfig(quality_images=10, images_per_prompt=3), 50) == 3


def test_quality_objectives():
    from diffusers_memcontrol.evaluation.evaluator import quality_objective

    metrics = {"fid": 40.0, "kid": 1.5, "c2st_accuracy": 0.9, "agreement": 0.25}
    assert [quality_objective(metrics, o) for o in ("fid", "kid", "c2st", "agreement", "fid_agreement")] == [
        40.0, 1.5, 0.9, 0.75, 30.0]
    with pytest.raises(ValueError, match="needs an agreement"):
        quality_objective({**metrics, "agreement": None}, "agreement")
    with pytest.raises(ValueError, match="search_objective"):
        EvaluationConfig(search_objective="bleu")


def test_search_quality_standard_error():
    """Binomial over the prompts for 1 - classifier agreement; None where the objective has no per-prompt form."""
    from diffusers_memcontrol.evaluation.config import quality_objective_se

    assert quality_objective_se(0.8, "classifier", 50, "agreement") == pytest.approx(0.0566, abs=1e-4)
    assert quality_objective_se(0.8, "classifier", 200, "agreement") == pytest.approx(0.0283, abs=1e-4)
    for args in ((0.8, "clip", 50, "agreement"), (0.8, "classifier", 50, "fid"), (None, "none", 50, "agreement"),
                 (0.8, "classifier", 50, "fid_agreement")):
        assert quality_objective_se(*args) is None
