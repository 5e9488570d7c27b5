import json

import pytest

from diffusers_memcontrol.reporting import pareto_plot, results_markdown, write_results


def test_results_table_order_and_files(tmp_path):
    rows = [
        {"method": "memcontrol", "mitigation": "none", "fid": 10.5, "amd": 0.3, "agreement": 0.9,
         "extracted_images": 0, "dmem": 1.2, "trainable_params": 9000},
        {"method": "full", "mitigation": "rwa", "fid": 9.0, "amd": 0.1, "agreement": 0.95,
         "extracted_images": 7, "dmem": 4.0, "trainable_params": 1_400_000},
        {"method": "freeze", "mitigation": "none", "fid": 80.0, "amd": 0.5, "agreement": None,
         "extracted_images": 0, "dmem": 0.5, "trainable_params": 0},
    ]
    text = results_markdown(rows)
    body = text.splitlines()[2:]
    assert [line.split("|")[1].strip() for line in body] == ["Freeze", "Full FT", "MemControl"]
    assert "1,400,000" in text and "n/a" in text and "RWA" in text
    md, js = write_results(rows, tmp_path)
    assert json.loads(open(js).read()) == rows
    assert open(md).read() == text


def test_pareto_plot_writes_png(tmp_path):
    trials = [{"number": i, "dmem": float(i), "fid": float(10 - i)} for i in range(6)] + [{"number": 6}]
    path = pareto_plot(trials, front=[0, 2, 5], chosen=2, path=str(tmp_path / "pareto.png"),
                       baselines={"Full FT": (7.0, 2.0)})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="No completed trial"):
        pareto_plot([{"number": 0}], front=[], chosen=None, path=str(tmp_path / "x.png"))
