"""The content-addressed latent / text-embedding cache (diffusers_memcontrol.cache) and its use by the trainer."""

from __future__ import annotations

import copy
import io
import os
import stat

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_memcontrol.cache import (
    FileHashMemo,
    TensorCache,
    caption_key,
    latent_cache,
    model_identity,
    sha256_bytes,
)
from diffusers_memcontrol.data import tiny_base as tb
from diffusers_memcontrol.data.encoding import encode_latent_distribution
from diffusers_memcontrol.data.images import transform_image
from diffusers_memcontrol.trainer.batches import prepare_training_data
from diffusers_memcontrol.trainer.config import FineTuneConfig
from diffusers_memcontrol.trainer.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=tb.build_vae(), text_encoder=tb.build_text_encoder(),
                                   tokenizer=tb.build_tokenizer(), unet=tb.build_unet(), scheduler=tb.build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def digits():
    return tb.load_domain("digits", "train").select(range(12))


def _key(i: int) -> str:
    return sha256_bytes(str(i).encode())


# ------------------------------------------------------------------------------------------------ the store
def test_tensor_cache_round_trip_in_any_order(tmp_path):
    cache = TensorCache(str(tmp_path), "latents", {"model": "m"})
    keys = [_key(i) for i in range(3)]
    rows = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 2, 2)
    cache.write(keys, {"mean": rows, "std": rows + 100})
    fresh = TensorCache(str(tmp_path), "latents", {"model": "m"})  # a new process: index read from disk
    out = fresh.load([keys[2], keys[0]], ("mean", "std"))
    assert torch.equal(out["mean"], rows[[2, 0]]) and torch.equal(out["std"], rows[[2, 0]] + 100)
    assert fresh.contains([keys[1], _key(9)]) == [True, False]
    other = TensorCache(str(tmp_path), "latents", {"model": "other"})
    assert other.contains(keys) == [False] * 3  # another namespace never reads these entries
    files = os.listdir(fresh.folder)
    assert not [f for f in files if f.startswith(".")]  # no temporary file left
    shard = next(f for f in files if f.endswith(".safetensors"))
    assert stat.S_IMODE(os.stat(os.path.join(fresh.folder, shard)).st_mode) & 0o044  # readable by other workers


def test_get_or_compute_encodes_only_what_is_missing(tmp_path):
    cache = TensorCache(str(tmp_path), "text", {"model": "m"})
    computed: list[int] = []

    def compute(positions):
        computed.extend(positions)
        return {"embeds": torch.tensor([[float(p)] for p in positions])}

    keys = [_key(i) for i in range(5)]
    first = cache.get_or_compute(keys[:3], compute, ("embeds",), batch_size=2, progress=False)
    assert computed == [0, 1, 2] and first["embeds"].flatten().tolist() == [0, 1, 2]
    computed.clear()
    cache = TensorCache(str(tmp_path), "text", {"model": "m"})
    second = cache.get_or_compute([keys[4], keys[1], keys[3]], compute, ("embeds",), progress=False)
    assert computed == [0, 2]  # positions of keys[4] and keys[3] in this request
    assert second["embeds"].flatten().tolist() == [0, 1, 2] and (cache.hits, cache.misses) == (1, 2)
    with pytest.raises(ValueError, match="unique"):
        cache.get_or_compute([keys[0], keys[0]], compute, ("embeds",), progress=False)


def test_an_unreadable_shard_is_ignored_not_trusted(tmp_path):
    cache = TensorCache(str(tmp_path), "latents", {"model": "m"})
    cache.write([_key(0)], {"mean": torch.zeros(1, 2)})
    with open(os.path.join(cache.folder, "broken.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    fresh = TensorCache(str(tmp_path), "latents", {"model": "m"})
    assert fresh.contains([_key(0), _key(1)]) == [True, False]


def test_file_hash_memo_rehashes_only_changed_files(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    memo = FileHashMemo(str(tmp_path / "hashes.sqlite"))
    assert memo.digest(str(path)) == sha256_bytes(b"one")
    memo.flush()
    path.write_bytes(b"two!")
    assert memo.digest(str(path)) == sha256_bytes(b"two!")
    memo.close()


def test_namespaces_follow_weights_and_resolution(pipe):
    vae = copy.deepcopy(pipe.vae)
    before = model_identity(vae, "some/model")
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    after = model_identity(vae, "some/model")
    assert before["config"] == after["config"] and before["weights"] != after["weights"]
    folders = {latent_cache("/c", before, r, c).folder for r in (32, 64) for c in (False, True)}
    assert len(folders | {latent_cache("/c", after, 32, False).folder}) == 5
    assert latent_cache("/c", before, 32, True, "bilinear").folder != latent_cache("/c", before, 32, True).folder


# ------------------------------------------------------------------------------------------------ with the trainer
def test_second_run_and_subsets_hit_the_cache(pipe, digits, tmp_path):
    cache_dir = str(tmp_path / "cache")
    first = prepare_training_data(pipe, digits, cache_dir=cache_dir, progress=False)
    assert first.stats["latent_cache"] | {"folder": None} == {"hits": 0, "misses": len(first.latent_mean),
                                                              "folder": None}
    second = prepare_training_data(pipe, digits, cache_dir=cache_dir, progress=False)
    assert second.stats["latent_cache"]["misses"] == 0 and second.stats["text_cache"]["misses"] == 0
    assert torch.equal(first.latent_mean, second.latent_mean) and torch.equal(first.prompt_embeds,
                                                                               second.prompt_embeds)
    # a reordered subset with duplicates (like the HPO set: proxy + D_mem x repeats) is served from the cache
    subset = digits.select([5, 3, 5, 5, 0])
    third = prepare_training_data(pipe, subset, cache_dir=cache_dir, progress=False)
    assert third.stats["latent_cache"]["misses"] == 0 and len(third.latent_mean) == 3
    for i, row in enumerate([5, 3, 5, 5, 0]):
        torch.testing.assert_close(third.latent_mean[third.latent_rows[i, 0]],
                                   second.latent_mean[second.latent_rows[row, 0]], rtol=0, atol=0)
    # the same data encoded fresh (no cache) gives the cached values
    fresh = prepare_training_data(pipe, digits, cache="memory", progress=False)
    torch.testing.assert_close(fresh.latent_mean[fresh.latent_rows[:, 0]],
                               second.latent_mean[second.latent_rows[:, 0]], rtol=0, atol=1e-5)


def test_random_flip_caches_both_orientations(pipe, digits):
    data = prepare_training_data(pipe, digits.select(range(3)), cache="memory", random_flip=True, progress=False)
    assert data.has_flip_variants and len(data.latent_mean) == 6
    image = digits[1]["image"]
    mean, std = encode_latent_distribution(pipe.vae, transform_image(image, 32, True, flip=True)[None])
    torch.testing.assert_close(data.latent_mean[data.latent_rows[1, 1]], mean[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(data.latent_std[data.latent_rows[1, 1]], std[0], rtol=0, atol=1e-5)


def _non_square_dataset(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    paths = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (48, 32), (40 * i, 10, 200)).save(buf, format="PNG")
        path = tmp_path / f"wide{i}.png"
        path.write_bytes(buf.getvalue())
        paths.append(str(path))
    return Dataset.from_dict({"image": paths, "text": ["wide", "wider", "widest"]}).cast_column("image",
                                                                                              ImageFeature())


def test_random_crops_fall_back_to_on_the_fly_encoding(pipe, tmp_path):
    dataset = _non_square_dataset(tmp_path)
    data = prepare_training_data(pipe, dataset, cache_dir=str(tmp_path / "c"), progress=False)
    assert not data.cached_latents and data.cached_text and "on the fly" in data.stats["latents"]
    centered = prepare_training_data(pipe, dataset, cache_dir=str(tmp_path / "c"), center_crop=True, progress=False)
    assert centered.cached_latents
    log = train(copy.deepcopy(pipe.unet), pipe.scheduler, data, FineTuneConfig(max_train_steps=2, train_batch_size=2),
                progress=False)
    assert log["latents"].startswith("on the fly") and len(log["losses"]) == 2
    with pytest.raises(ValueError, match="prepared with interpolation 'lanczos' but the config asks for 'bicubic'"):
        train(copy.deepcopy(pipe.unet), pipe.scheduler, data,
              FineTuneConfig(max_train_steps=2, train_batch_size=2, image_interpolation_mode="bicubic"), progress=False)
    resized = prepare_training_data(pipe, dataset, cache_dir=str(tmp_path / "c"), center_crop=True,
                                    interpolation="nearest", progress=False)
    assert resized.stats["latent_cache"]["misses"] == 3  # another resize is another cache entry


def test_cached_and_on_the_fly_training_agree(pipe, digits):
    config = FineTuneConfig(peft_method="difffit", max_train_steps=3, train_batch_size=4, learning_rate=1e-2,
                            random_flip=True, caption_dropout=0.3, seed=5)
    states = []
    for cache in ("memory", "off"):
        data = prepare_training_data(pipe, digits.select(range(8)), cache=cache, random_flip=True, progress=False)
        unet = copy.deepcopy(pipe.unet)
        train(unet, pipe.scheduler, data, config, progress=False)
        states.append({n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad})
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=1e-5)


def test_captions_are_never_written_to_the_cache(pipe, digits, tmp_path):
    secret = "zebra-secret-caption-1234"
    dataset = digits.select(range(2)).map(lambda row: {"text": secret})
    prepare_training_data(pipe, dataset, cache_dir=str(tmp_path), progress=False)
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), name
    assert caption_key(secret) != secret
