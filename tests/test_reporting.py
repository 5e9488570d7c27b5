import json

import pytest

from diffusers_memcontrol.constants import DMEM_GENERATIONS_FILE
from diffusers_memcontrol.evaluation.reporting import pareto_plot, results_markdown, write_results


def test_results_table_order_and_files(tmp_path):
    rows = [
        {"method": "memcontrol", "mitigation": "none", "fid": 10.5, "amd": 0.3, "agreement": 0.9,
         "extracted_images": 0, "dmem": 1.2, "trainable_params": 9000},
        {"method": "full", "mitigation": "rwa", "fid": 9.0, "amd": 0.1, "agreement": 0.95,
         "extracted_images": 7, "copied_images": 3, "memorized_prompts": 9, "dmem": 4.0,
         "trainable_params": 1_400_000},
        {"method": "freeze", "mitigation": "none", "fid": 80.0, "amd": 0.5, "agreement": None,
         "extracted_images": 0, "dmem": 0.5, "trainable_params": 0},
    ]
    text = results_markdown(rows)
    body = text.splitlines()[2:]
    assert [line.split("|")[1].strip() for line in body] == ["Freeze", "Full FT", "MemControl"]
    assert "1,400,000" in text and "n/a" in text and "RWA" in text
    header = [cell.strip() for cell in text.splitlines()[0].split("|")]
    extracted, copies = header.index("Extracted (calibrated) ↓"), header.index("Copies (nearest-neighbour) ↓")
    assert header.index("Memorized prompts ↓") == copies + 1 == extracted + 2
    full = [cell.strip() for cell in body[1].split("|")]
    assert full[header.index("Memorized prompts ↓")] == "9"
    assert (full[extracted], full[copies], full[header.index("AMD ↑")]) == ("7", "3", "0.1")
    md, js = write_results(rows, tmp_path)
    assert json.loads(open(js).read()) == rows
    assert open(md).read() == text


def test_pareto_plot_writes_png(tmp_path):
    trials = [{"number": i, "memorization_objective": float(i), "quality_objective": float(10 - i)}
              for i in range(6)] + [{"number": 6}]
    path = pareto_plot(trials, front=[0, 2, 5], chosen=2, path=str(tmp_path / "pareto.png"),
                       baselines={"Full FT": (7.0, 2.0)})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="No completed trial"):
        pareto_plot([{"number": 0}], front=[], chosen=None, path=str(tmp_path / "x.png"))


def _fake_run(folder, pairs: int, seed: int) -> str:
    """A stage-2 run folder holding kept D_mem generations (random pixels), one extracted and one clique member."""
    import torch

    from diffusers_memcontrol.evaluation.figures import save_dmem_generations

    generator = torch.Generator().manual_seed(seed)
    generations = torch.rand(pairs, 10, 3, 32, 32, generator=generator) * 2 - 1
    flags = torch.zeros(pairs, 10, dtype=torch.uint8)
    flags[0, 7], flags[-1, 9] = 3, 1
    folder.mkdir(parents=True)
    save_dmem_generations(folder / DMEM_GENERATIONS_FILE, generations, generations[:, 0], flags)
    return str(folder)


@pytest.mark.parametrize("pairs", [2, 4])
def test_memorization_figure_layout(tmp_path, pairs):
    from PIL import Image

    from diffusers_memcontrol.evaluation.figures import load_dmem_generations, memorization_figure

    runs = {"Full FT": _fake_run(tmp_path / "full", pairs, 0), "MemControl": _fake_run(tmp_path / "mc", pairs, 1)}
    saved = load_dmem_generations(tmp_path / "full" / "dmem_generations.safetensors")
    assert saved["generations"].shape == (pairs, 8, 3, 32, 32)  # 8 kept per prompt, flagged ones first
    assert saved["flags"][0, 0] == 3 and saved["flags"][-1, 0] == 1
    path = memorization_figure(runs, str(tmp_path / "memorization.png"), n_pairs=pairs, n_generations=3)
    width, height = Image.open(path).size
    other = memorization_figure(runs, str(tmp_path / "one.png"), n_pairs=1, n_generations=3)
    assert Image.open(other).size[0] == width and Image.open(other).size[1] < height  # one row per pair
    wider = memorization_figure(runs, str(tmp_path / "wide.png"), n_pairs=1, n_generations=5)
    assert Image.open(wider).size[0] > width  # 1 + 2 runs x generations columns


def test_stage_two_figure_picks_full_memcontrol_and_the_best_other_baseline(tmp_path):
    from diffusers_memcontrol.evaluation.figures import write_memorization_figure

    for name in ("full-none", "memcontrol-none", "difffit-none"):
        _fake_run(tmp_path / "final" / name, 2, 0)
    rows = [{"method": "full", "mitigation": "none", "fid": 9.0}, {"method": "memcontrol", "mitigation": "none",
            "fid": 8.0}, {"method": "difffit", "mitigation": "none", "fid": 7.0},
            {"method": "svdiff", "mitigation": "none", "fid": 12.0}, {"method": "svdiff", "mitigation": "rwa",
            "fid": 1.0}]
    path = write_memorization_figure(rows, str(tmp_path))
    assert path == str(tmp_path / "memorization.png")
    with open(path, "rb") as fh:
        assert fh.read(4) == b"\x89PNG"
    rows[2]["fid"] = 20.0  # SV-DIFF is now the best other baseline, and its run kept no generations
    assert write_memorization_figure(rows, str(tmp_path)) is None


def test_ceiling_row_comes_first_with_quality_columns_only_and_a_noise_table():
    from diffusers_memcontrol.evaluation.reporting import ceiling_row

    metrics = {"fid": 70.0, "kid": 2.0, "fid_noise": 3.0, "dmem": 0.5, "trainable_params": 0,
               "ceiling": {"fid": 3.2, "kid": 0.11, "agreement": 0.99, "in_domain": 1.0, "fid_noise": 1.7,
                           "cached": True, "num_images": 200}}
    ceiling = ceiling_row(metrics)
    assert ceiling["method"] == "ceiling" and "cached" not in ceiling and ceiling["fid"] == 3.2
    assert ceiling_row({"fid": 1.0}) is None
    text = results_markdown([{"method": "freeze", "mitigation": "none", **metrics}, ceiling])
    body = text.splitlines()[2:4]
    assert body[0].startswith("| Real test images through the VAE (ceiling) | — | 3.2 | 0.11 |")
    assert body[1].startswith("| Freeze |")
    header = [cell.strip() for cell in text.splitlines()[0].split("|")]
    assert [c.strip() for c in body[0].split("|")][header.index("d_mem ↓")] == "—"
    assert "Noise of each quality metric" in text and "| Freeze | — | 3 |" in text


def test_memorization_figure_shows_the_vae_round_trip_ceiling(tmp_path):
    import torch
    from PIL import Image

    from diffusers_memcontrol.evaluation.figures import (
        DMEM_GENERATIONS_FILE,
        load_dmem_generations,
        memorization_figure,
        save_dmem_generations,
    )

    plain = _fake_run(tmp_path / "plain", 2, 0)
    generations = torch.rand(2, 10, 3, 32, 32) * 2 - 1
    (tmp_path / "ceiling").mkdir()
    save_dmem_generations(tmp_path / "ceiling" / DMEM_GENERATIONS_FILE, generations, generations[:, 0],
                          torch.zeros(2, 10, dtype=torch.uint8), round_trips=generations[:, 1])
    assert load_dmem_generations(tmp_path / "ceiling" / DMEM_GENERATIONS_FILE)["round_trips"].shape == (2, 3, 32, 32)
    without = memorization_figure({"A": plain}, str(tmp_path / "a.png"), n_pairs=2, n_generations=3)
    with_ceiling = memorization_figure({"A": str(tmp_path / "ceiling")}, str(tmp_path / "b.png"), n_pairs=2,
                                       n_generations=3)
    assert Image.open(with_ceiling).size[0] > Image.open(without).size[0]  # one more column: the ceiling
