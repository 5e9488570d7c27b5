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
