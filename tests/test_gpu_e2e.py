"""benchmarks/gpu_e2e.sh at its CPU tiny size: the GPU end-to-end check's chain must keep working without a GPU."""

from __future__ import annotations

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_e2e_runs_at_tiny_size_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_e2e.sh"), "--model", "tiny", "--work_dir",
                    str(tmp_path / "work")], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(tmp_path / "gpu_e2e_tiny.json", encoding="utf-8") as f:
        report = json.load(f)
    assert list(report["phases"]) == ["search", "stage_two", "publish_dry_run", "load_and_generate", "audit"]
    assert report["audit_scan"]["captions"] >= 100 and report["audit_scan"]["scan_seconds_per_1000_captions"] > 0
    assert all(p["wall_s"] > 0 and p["peak_gpu_mib"] is None for p in report["phases"].values())
    assert report["stage_two_rows"] == ["freeze-none", "memcontrol-none"]
    assert report["image_size"][0] > 0
    assert os.path.isfile(tmp_path / "work" / "published" / "README.md")  # the dry-run repo with its card
