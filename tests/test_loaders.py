"""pipe.load_memcontrol_adapter / unload_memcontrol_adapter on a tiny offline StableDiffusionPipeline."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTextConfig, CLIPTextModel

import diffusers_memcontrol  # noqa: F401  (registers the peft method)
from diffusers_memcontrol import MaskSpace, MemControlConfig
from diffusers_memcontrol.data.tiny_base import build_tokenizer
from diffusers_memcontrol.hub.adapters import save_adapter
from diffusers_memcontrol.hub.loaders import (
    MemControlLoaderMixin,
    load_unet_adapter,
    memcontrol_adapter_names,
    register_pipeline_methods,
)
from diffusers_memcontrol.hub.publish import MemControlRepoError
from tests.conftest import make_small_unet

register_pipeline_methods()  # what diffusers_memcontrol/__init__.py does on import


pytestmark = pytest.mark.usefixtures("one_thread")  # SV-DIFF's per-layer SVDs: one thread (conftest)


# ----------------------------------------------------------------------------------------------------------------
# helpers shared with tests/test_hub.py
# ----------------------------------------------------------------------------------------------------------------
def make_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline at toy size (16 px images, 8x8 latents), identical for the same seed."""
    unet = make_small_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37,
                                                num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                                bos_token_id=512, eos_token_id=513, pad_token_id=513))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 5, 32, generator=generator))


def train_adapter(unet, output_dir, method: str = "svdiff", bits=None, steps: int = 3, lr: float = 1e-2):
    """Fine-tune a MemControl adapter for a few steps, save it with training.save_adapter; return the final outputs."""
    space = MaskSpace.from_unet(unet, method, "blocks")
    mask = space.mask(bits) if bits is not None else space.mask([1, 0] * (len(space) // 2))
    unet.add_adapter(MemControlConfig(method=method, mask=mask))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    inputs = unet_inputs()
    for _ in range(steps):
        loss = unet(*inputs).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(unet, str(output_dir))
    with torch.no_grad():
        return unet(*inputs).sample


def generate(pipe, seed: int = 0):
    return pipe("a small test prompt", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def unet_state(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def assert_untouched(unet, before):
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    assert not getattr(unet, "peft_config", None)
    after = unet.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def write_hf_cache(cache_dir, repo_id: str, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out files as huggingface_hub's cache does: blobs/<hash>, snapshots/<commit>/<name> -> blob, refs/main."""
    storage = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, content in files.items():
        blob = hashlib.sha256(content).hexdigest()
        with open(os.path.join(storage, "blobs", blob), "wb") as f:
            f.write(content)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def folder_files(folder) -> dict:
    return {n: Path(folder, n).read_bytes() for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One svdiff adapter trained on the seed-0 pipeline's UNet: (folder, final UNet outputs, 2-step images)."""
    folder = tmp_path_factory.mktemp("svdiff-adapter")
    pipe = make_tiny_pipeline()
    outputs = train_adapter(pipe.unet, folder)
    return folder, outputs, generate(pipe)


# ----------------------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------------------
def test_load_reproduces_the_end_of_training(trained):
    folder, outputs, images = trained
    pipe = make_tiny_pipeline()
    base_images = generate(pipe)
    name = pipe.load_memcontrol_adapter(str(folder))
    assert name == "memcontrol" and memcontrol_adapter_names(pipe.unet) == ["memcontrol"]
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "memcontrol_" in n)
    assert_output(pipe, outputs)
    loaded_images = generate(pipe)
    assert abs(images - loaded_images).max() < 1e-5
    assert abs(base_images - loaded_images).max() > 1e-4  # the adapter really changes generations


def assert_output(pipe, expected: torch.Tensor) -> None:
    """The pipeline's UNet predicts `expected` on the fixed test inputs."""
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*unet_inputs()).sample, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["difffit", "lora", "attention"])
def test_other_methods_round_trip(method, tmp_path):
    unet = make_small_unet()
    outputs = train_adapter(unet, tmp_path, method=method)
    pipe = make_tiny_pipeline()
    pipe.load_memcontrol_adapter(tmp_path)
    assert_output(pipe, outputs)


def test_fuse_merges_and_unload_restores(trained):
    folder, outputs, _ = trained
    pipe = make_tiny_pipeline()
    before = unet_state(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(*unet_inputs()).sample
    pipe.load_memcontrol_adapter(folder, fuse=True)
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.merged for m in layers if m.memcontrol_roles.get("memcontrol"))
    assert_output(pipe, outputs)
    assert pipe.unload_memcontrol_adapter() == ["memcontrol"]
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert all(torch.allclose(after[k], before[k], atol=1e-5) for k in before)
    assert_output(pipe, base)


def test_unload_unfused_restores_exactly(trained):
    folder, _, _ = trained
    pipe = make_tiny_pipeline()
    before = unet_state(pipe.unet)
    pipe.load_memcontrol_adapter(folder)
    pipe.unload_memcontrol_adapter("memcontrol")
    assert_untouched(pipe.unet, before)
    assert pipe.unload_memcontrol_adapter() == []


def test_named_adapters(trained, tmp_path):
    folder, outputs, _ = trained
    pipe = make_tiny_pipeline()
    assert pipe.load_memcontrol_adapter(folder, adapter_name="a") == "a"
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_memcontrol_adapter(folder, adapter_name="a")
    assert pipe.load_memcontrol_adapter(folder) == "memcontrol"
    assert pipe.load_memcontrol_adapter(folder) == "memcontrol_1"
    assert sorted(memcontrol_adapter_names(pipe.unet)) == ["a", "memcontrol", "memcontrol_1"]
    with pytest.raises(ValueError, match="No MemControl adapter named 'b'"):
        pipe.unload_memcontrol_adapter("b")
    pipe.unload_memcontrol_adapter("memcontrol")
    pipe.unload_memcontrol_adapter("memcontrol_1")
    assert memcontrol_adapter_names(pipe.unet) == ["a"]
    with torch.no_grad():  # the remaining adapter alone is active again
        torch.testing.assert_close(pipe.unet(*unet_inputs()).sample, outputs, atol=1e-5, rtol=0)


def test_load_into_bare_unet_and_from_hf_cache(trained, tmp_path):
    folder, outputs, _ = trained
    write_hf_cache(tmp_path / "cache", "org/memcontrol-svdiff", folder_files(folder))
    unet = make_small_unet()
    load_unet_adapter(unet, "org/memcontrol-svdiff", cache_dir=tmp_path / "cache", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(unet(*unet_inputs()).sample, outputs, atol=1e-5, rtol=0)
    pipe = make_tiny_pipeline()
    pipe.load_memcontrol_adapter("org/memcontrol-svdiff", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    assert_output(pipe, outputs)


# ----------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------
def test_registration_is_idempotent_and_needs_a_unet():
    register_pipeline_methods()
    register_pipeline_methods()
    assert StableDiffusionPipeline.load_memcontrol_adapter is MemControlLoaderMixin.load_memcontrol_adapter
    assert DiffusionPipeline.unload_memcontrol_adapter is MemControlLoaderMixin.unload_memcontrol_adapter

    class NoUNetPipeline(DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    pipe = NoUNetPipeline(DDIMScheduler())
    with pytest.raises(ValueError, match="has no `unet` component"):
        pipe.load_memcontrol_adapter("org/name")


# ----------------------------------------------------------------------------------------------------------------
# refusals: each before any weight changes
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_folder(trained, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(trained[0], folder)
    return folder


def _refused(source, match, **kwargs):
    pipe = make_tiny_pipeline()
    before = unet_state(pipe.unet)
    with pytest.raises(MemControlRepoError, match=match):
        pipe.load_memcontrol_adapter(source, **kwargs)
    assert_untouched(pipe.unet, before)


def test_refuses_folder_without_mask(bad_folder):
    os.remove(bad_folder / "mask.json")
    _refused(bad_folder, "has no mask.json")


def test_refuses_pickle_weights(bad_folder):
    os.replace(bad_folder / "adapter_model.safetensors", bad_folder / "adapter_model.bin")
    _refused(bad_folder, "only safetensors are loaded")


def test_refuses_mask_only_folder(bad_folder):
    os.remove(bad_folder / "adapter_model.safetensors")
    os.remove(bad_folder / "adapter_config.json")
    _refused(bad_folder, "mask-only repository")


def test_refuses_symlink_leaving_the_folder(bad_folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    os.replace(bad_folder / "adapter_model.safetensors", outside)
    os.symlink(outside, bad_folder / "adapter_model.safetensors")
    _refused(bad_folder, "path traversal")


def test_refuses_mask_of_another_architecture(tmp_path):
    unet = make_small_unet(layers_per_block=1)  # fewer transformer blocks: other positions
    train_adapter(unet, tmp_path, steps=1)
    _refused(tmp_path, "another architecture")


def test_refuses_same_positions_other_widths(tmp_path):
    unet = make_small_unet(block_out_channels=(16, 16, 32, 32))
    assert MaskSpace.from_unet(unet, "svdiff", "blocks").positions == \
        MaskSpace.from_unet(make_small_unet(), "svdiff", "blocks").positions
    train_adapter(unet, tmp_path, steps=1)
    _refused(tmp_path, "shape mismatches")


def test_refuses_other_peft_types(bad_folder):
    config = json.loads((bad_folder / "adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (bad_folder / "adapter_config.json").write_text(json.dumps(config))
    _refused(bad_folder, "not a MemControl one")


def test_refuses_disagreeing_masks(bad_folder):
    mask = json.loads((bad_folder / "mask.json").read_text())
    mask["bits"] = [1 - b for b in mask["bits"]]
    (bad_folder / "mask.json").write_text(json.dumps(mask))
    _refused(bad_folder, "disagree")


def test_refuses_bad_cache_entries(trained, tmp_path):
    files = folder_files(trained[0])
    pickled = {k: v for k, v in files.items() if k != "adapter_model.safetensors"}
    pickled["adapter_model.bin"] = files["adapter_model.safetensors"]
    write_hf_cache(tmp_path, "org/pickled", pickled)
    _refused("org/pickled", "only safetensors are loaded", cache_dir=str(tmp_path), local_files_only=True)
    snapshot = write_hf_cache(tmp_path, "org/escape", {k: v for k, v in files.items() if k != "mask.json"})
    (tmp_path / "elsewhere.json").write_bytes(files["mask.json"])
    os.symlink(tmp_path / "elsewhere.json", os.path.join(snapshot, "mask.json"))
    _refused("org/escape", "path traversal", cache_dir=str(tmp_path), local_files_only=True)


def test_without_a_meta_twin_a_mismatch_is_rolled_back(tmp_path, monkeypatch):
    from diffusers_memcontrol.hub import loaders as loaders

    monkeypatch.setattr(loaders, "_meta_twin", lambda unet: None)  # e.g. a UNet class without from_config
    train_adapter(make_small_unet(block_out_channels=(16, 16, 32, 32)), tmp_path, steps=1)
    _refused(tmp_path, "shape mismatches")
