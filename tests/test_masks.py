import json

import pytest

from diffusers_memcontrol import Mask, MaskSpace

# Figures of the reference code on SD1.5 (anchors.md): SV-DIFF shifts on the whole UNet and in the 13 masked
# positions, DiffFit gammas and biases/norms, and the UNet size.
SD15_SVDIFF_TOTAL = 222_805
SD15_SVDIFF_PAPER_POSITIONS = 97_319
SD15_DIFFFIT_GAMMAS = 137_280
SD15_DIFFFIT_BIAS_NORM = 443_844
SD15_UNET_PARAMS = 859_520_964


@pytest.mark.parametrize(
    "method,layout,expected",
    [
        ("svdiff", "blocks", 16),
        ("svdiff", "attention", 32),
        ("svdiff", "paper", 13),
        ("difffit", "paper", 13),
        ("attention", "paper", 16),
        ("lora", "blocks", 16),
        ("full", "attention", 32),
    ],
)
def test_sd15_positions(sd15_meta_unet, method, layout, expected):
    space = MaskSpace.from_unet(sd15_meta_unet, method=method, layout=layout)
    assert len(space) == expected
    assert len(set(space.positions)) == expected
    modules = dict(sd15_meta_unet.named_modules())
    assert all(p in modules for p in space.positions)


def test_sd15_order_and_paper_layout(sd15_meta_unet):
    space = MaskSpace.from_unet(sd15_meta_unet, method="svdiff", layout="paper")
    assert space.positions[0] == "down_blocks.0.attentions.0"
    assert space.positions[6] == "mid_block.attentions.0"
    assert space.positions[-1] == "up_blocks.3.attentions.1"
    assert not any(p.endswith("attentions.2") for p in space.positions)


def test_sd15_trainable_counts_match_reference(sd15_meta_unet):
    unet = sd15_meta_unet
    svdiff = MaskSpace.from_unet(unet, "svdiff", "paper")
    assert svdiff.count_trainable(svdiff.full(), unet) == SD15_SVDIFF_TOTAL
    assert svdiff.count_trainable(svdiff.full(), unet, scope="strict") == SD15_SVDIFF_PAPER_POSITIONS
    assert svdiff.count_trainable(svdiff.empty(), unet) == SD15_SVDIFF_TOTAL - SD15_SVDIFF_PAPER_POSITIONS
    assert svdiff.count_trainable(svdiff.empty(), unet, scope="strict") == 0

    blocks = MaskSpace.from_unet(unet, "svdiff", "blocks")
    one = blocks.mask([1] + [0] * 15)
    assert blocks.count_trainable(one, unet, scope="strict") == 3_203  # one width-320 block

    difffit = MaskSpace.from_unet(unet, "difffit", "blocks")
    assert difffit.count_trainable(difffit.full(), unet) == SD15_DIFFFIT_GAMMAS + SD15_DIFFFIT_BIAS_NORM
    assert difffit.count_trainable(difffit.empty(), unet) == SD15_DIFFFIT_BIAS_NORM

    full = MaskSpace.from_unet(unet, "full", "blocks")
    assert full.count_trainable(full.full(), unet) == SD15_UNET_PARAMS
    freeze = MaskSpace.from_unet(unet, "freeze", "blocks")
    assert freeze.count_trainable(freeze.full(), unet) == 0

    lora = MaskSpace.from_unet(unet, "lora", "blocks")
    assert lora.count_trainable(lora.full(), unet, lora_rank=4) == 797_184  # diffusers' usual r=4 attention LoRA


def test_half_mask_trains_less(sd15_meta_unet):
    space = MaskSpace.from_unet(sd15_meta_unet, "attention", "attention")
    half = space.mask([1, 0] * 16)
    assert 0 < space.count_trainable(half, sd15_meta_unet) < space.count_trainable(space.full(), sd15_meta_unet)


def test_mask_json_round_trip(small_unet, tmp_path):
    space = MaskSpace.from_unet(small_unet, "difffit", "attention")
    mask = space.mask([1, 0] * (len(space) // 2))
    assert Mask.from_json(mask.to_json()) == mask
    mask.save(tmp_path / "mask.json")
    assert Mask.load(tmp_path) == mask
    data = json.loads(mask.to_json())
    assert set(data) == {"method", "layout", "positions", "bits"}
    assert space.mask(mask.bitstring) == mask


def test_mask_load_reads_what_training_search_and_publishing_write(small_unet, tmp_path):
    space = MaskSpace.from_unet(small_unet, "svdiff", "paper")
    mask = space.mask([1, 0] * (len(space) // 2) + [1] * (len(space) % 2))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "MEMCONTROL", "mask": mask.to_dict()}))
    assert Mask.load(adapter) == mask == Mask.load(adapter / "adapter_config.json")
    search = tmp_path / "search"
    search.mkdir()
    mask.save(search / "best_mask.json")
    assert Mask.load(search) == mask
    with pytest.raises(FileNotFoundError, match="No mask.json, best_mask.json, adapter_config.json holding a mask in folder"):
        Mask.load(tmp_path / "search" / "..")


def test_wrong_length_names_space_size(small_unet):
    space = MaskSpace.from_unet(small_unet, "svdiff", "blocks")
    with pytest.raises(ValueError, match=f"len\\(space\\) = {len(space)}"):
        space.mask([1, 0])


def test_bad_inputs(small_unet):
    with pytest.raises(ValueError, match="Unknown method 'bitfit'"):
        MaskSpace.from_unet(small_unet, "bitfit", "blocks")
    with pytest.raises(ValueError, match="Unknown layout 'rows'"):
        MaskSpace.from_unet(small_unet, "svdiff", "rows")
    space = MaskSpace.from_unet(small_unet, "svdiff", "blocks")
    with pytest.raises(ValueError, match="0 or 1"):
        space.mask([2] * len(space))
    other = MaskSpace.from_unet(small_unet, "svdiff", "attention")
    with pytest.raises(ValueError, match="does not fit"):
        space.validate(other.full())
    with pytest.raises(ValueError, match="missing"):
        Mask.from_json('{"method": "svdiff"}')


def test_positions_follow_the_architecture(small_unet):
    from tests.conftest import make_small_unet

    bigger = make_small_unet(layers_per_block=1)
    assert len(MaskSpace.from_unet(small_unet, "svdiff", "blocks")) == 16
    # 3 cross-attention down/up levels with 1 layer: 3 down + 1 mid + 3*2 up
    assert len(MaskSpace.from_unet(bigger, "svdiff", "blocks")) == 10
    assert len(MaskSpace.from_unet(bigger, "svdiff", "paper")) == 7


# ---------------------------------------------------------------------------- built-in masks


def _paper_bits(space: MaskSpace, down: set[int], up: set[int]) -> list[int]:
    """The paper's Sec. 4.5 mask read with block numbers `down` / `up` for the self-attentions left frozen."""
    bits = []
    for position in space.positions:
        stage, index = position.split(".")[:2]
        frozen = position.endswith(".attn1") and (
            (stage == "down_blocks" and int(index) in down) or (stage == "up_blocks" and int(index) in up))
        bits.append(0 if frozen else 1)
    return bits


def test_paper_mask_is_the_reading_closest_to_the_papers_share(sd15_meta_unet):
    from diffusers_memcontrol.tuners.memcontrol.builtin_masks import builtin_mask

    builtin = builtin_mask("memcontrol:paper-mimic-svdiff")
    space = MaskSpace.from_unet(sd15_meta_unet, method="svdiff", layout="attention")
    unet_params = sum(p.numel() for p in sd15_meta_unet.parameters())
    assert builtin.unet_params == unet_params
    target = 0.019 / 100 * unet_params  # "fine-tuning 0.019% of the parameters in Stable Diffusion U-Net"
    readings = {}  # (numbering, scope) -> (bits, trainable count)
    for numbering, down, up in (("1-based", {1, 2}, {2, 3}), ("0-based", {2, 3}, {3, 4})):
        bits = _paper_bits(space, down, up)
        for scope in ("reference", "strict"):
            readings[numbering, scope] = bits, space.count_trainable(space.mask(bits), sd15_meta_unet, scope=scope)
    closest = min(readings, key=lambda r: abs(readings[r][1] - target))
    bits, count = readings[closest]
    assert closest == ("1-based", builtin.scope)  # the reading the anchors call most likely is also the closest
    assert list(builtin.mask.bits) == bits and builtin.mask.positions == tuple(space.positions)
    assert builtin.trainable_params == count == space.count_trainable(builtin.mask, sd15_meta_unet, scope="reference")
    assert all(attn2 == 1 for p, attn2 in zip(space.positions, builtin.mask.bits) if p.endswith(".attn2"))
    # the description states the shipped count and every other reading's count
    assert all(f"{n:,}" in builtin.description for _, n in readings.values())
    assert f"{100 * count / unet_params:.4f}%" in builtin.description


def test_builtin_mask_resolves_where_a_mask_file_does(sd15_meta_unet, tmp_path):
    from diffusers_memcontrol.hub.adapters import resolve_mask
    from diffusers_memcontrol.tuners.memcontrol.builtin_masks import builtin_mask

    builtin = builtin_mask("paper-mimic-svdiff")
    spec = "memcontrol:paper-mimic-svdiff"
    assert builtin.mask == Mask.load(builtin.path)  # the shipped file reads like a mask file
    assert resolve_mask(spec, sd15_meta_unet, "svdiff", "blocks") == builtin.mask  # the trainer's --mask
    assert resolve_mask(spec, sd15_meta_unet, None, "blocks") == builtin.mask  # transfer: the mask's own method
    builtin.mask.save(tmp_path / "mask.json")
    assert resolve_mask(str(tmp_path), sd15_meta_unet, "svdiff", "blocks") == builtin.mask


def test_builtin_mask_trains_what_it_says(sd15_meta_unet):
    """Injected into an SD1.5-shaped UNet (same blocks, small width): frozen attn1s get no shifts, attn2s do."""
    from diffusers_memcontrol import MemControlConfig
    from diffusers_memcontrol.hub.adapters import resolve_mask
    from tests.conftest import make_small_unet

    unet = make_small_unet()
    mask = resolve_mask("memcontrol:paper-mimic-svdiff", unet, "svdiff", "blocks")
    unet.add_adapter(MemControlConfig(method="svdiff", mask=mask))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == MaskSpace.from_unet(
        unet, "svdiff", "attention").count_trainable(mask, make_small_unet())
    for position, bit in zip(mask.positions, mask.bits):
        assert any(n.startswith(position + ".") for n in trainable) == bool(bit), position


def test_builtin_mask_refuses_another_method_or_architecture(sd15_meta_unet):
    from diffusers_memcontrol.hub.adapters import resolve_mask
    from tests.conftest import make_small_unet

    spec = "memcontrol:paper-mimic-svdiff"
    with pytest.raises(ValueError, match=r"'memcontrol:paper-mimic-svdiff' is for PEFT method 'svdiff'.*'difffit'.*"
                                         r"--peft_method svdiff"):
        resolve_mask(spec, sd15_meta_unet, "difffit", "blocks")
    other = make_small_unet(layers_per_block=1)
    n = len(MaskSpace.from_unet(other, "svdiff", "attention"))
    with pytest.raises(ValueError, match=rf"'memcontrol:paper-mimic-svdiff' \(svdiff, attention layout, 32 positions\) "
                                         rf"is for the UNet of stable-diffusion-v1-5/.*has {n} positions"):
        resolve_mask(spec, other, "svdiff", "blocks")
    with pytest.raises(ValueError, match=r"Unknown built-in mask 'memcontrol:nope'; built-in masks: .*"
                                         r"memcontrol:paper-mimic-svdiff"):
        resolve_mask("memcontrol:nope", sd15_meta_unet, "svdiff", "blocks")
