"""MemControl end to end on one machine: a 2-trial search, stage 2 for two rows, publish --dry_run, load and generate,
`memcontrol audit --scan` of the MemControl row (scan time per 1,000 captions).

`--model sd15`: Stable Diffusion 1.5's architecture with random weights (`sd15.py`), 512 px, bf16 and gradient
checkpointing, on the GPU (`benchmarks/gpu_e2e.sh`). `--model tiny`: the shipped tiny base at its own size on CPU (the
test suite runs it so this script cannot rot). Writes JSON: wall time per phase and peak GPU memory (the
trainers run in their own processes, so the peak is sampled with nvidia-smi; None without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def build_sd15(folder: str) -> str:
    """Save an SD1.5-shaped pipeline with random weights (safetensors) to `folder`; return it."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, HERE)
    from sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

    from diffusers_memcontrol.data import tiny_base as tb

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
                                   tokenizer=tb.build_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET),
                                   scheduler=tb.build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


class GpuPeak:
    """The largest `memory.used` (MiB) nvidia-smi reports while the block runs (None without nvidia-smi)."""

    def __enter__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout
                used = max(int(x) for x in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> dict:
    """Run the phases; write and return the report."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--work_dir", default="/tmp/memcontrol-gpu-e2e")
    p.add_argument("--output", default=os.path.join(HERE, "results", "gpu_e2e.json"))
    p.add_argument("--gpus_per_trial", type=int, default=1)
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    out = os.path.join(args.work_dir, "run")
    phases: dict[str, dict] = {}

    def phase(name: str, fn) -> None:
        started = time.time()
        with GpuPeak() as peak:
            fn()
        phases[name] = {"wall_s": round(time.time() - started, 1), "peak_gpu_mib": peak.peak}
        print(f"{name}: {phases[name]}", flush=True)

    model = {}
    if args.model == "sd15":
        phase("build_model", lambda: model.update(path=build_sd15(os.path.join(args.work_dir, "sd15"))))
        size = ["--resolution", "512", "--mixed_precision", "bf16", "--gradient_checkpointing",
                "--train_batch_size", "4", "--max_train_steps", "3", "--max_train_samples", "32"]
    else:
        from diffusers_memcontrol.data.tiny_base import tiny_base_path

        model["path"] = tiny_base_path()
        size = ["--train_batch_size", "4", "--max_train_steps", "1", "--max_train_samples", "8"]  # the suite's check
    common = ["--pretrained_model_name_or_path", model["path"], *size, "--dmem_size", "4", "--dmem_repeats", "2",
              "--proxy_fraction", "0.05", "--dmem_unique_captions", "--eval_num_prompts", "2", "--eval_extraction_generations", "3",
              "--eval_inference_steps", "1", "--search_space", "difffit", "--mask_layout", "paper", "--n_trials", "2",
              "--population_size", "2", "--n_workers", "1", "--gpus_per_trial", str(args.gpus_per_trial),
              "--baselines", "freeze", "--mitigations", "none", "--output_dir", out]
    train = [sys.executable, "-m", "diffusers_memcontrol.cli", "search"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    phase("search", lambda: subprocess.run([*train, "--stage", "1", *common], check=True, env=env))
    phase("stage_two", lambda: subprocess.run([*train, "--stage", "2", *common], check=True, env=env))
    repo = os.path.join(args.work_dir, "published")
    phase("publish_dry_run", lambda: subprocess.run(
        [sys.executable, "-m", "diffusers_memcontrol.cli", "publish", os.path.join(out, "final", "memcontrol-none"),
         "--repo_id", "local/memcontrol-e2e", "--dry_run", "--local_dir", repo], check=True, env=env))

    def load_and_generate() -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        import diffusers_memcontrol  # noqa: F401  (registers pipe.load_memcontrol_adapter)

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = StableDiffusionPipeline.from_pretrained(model["path"], safety_checker=None,
                                                       requires_safety_checker=False).to(device)
        pipe.load_memcontrol_adapter(repo)
        pipe.set_progress_bar_config(disable=True)
        resolution = 512 if args.model == "sd15" else pipe.unet.config.sample_size * pipe.vae_scale_factor
        image = pipe("a photo", num_inference_steps=2, height=resolution, width=resolution,
                     generator=torch.Generator().manual_seed(0)).images[0]
        model["image_size"] = list(image.size)

    phase("load_and_generate", load_and_generate)
    # `memcontrol audit` of the MemControl row: a scan of 1,000 distinct captions (100 at tiny size: D_mem pairs with a
    # unique word each) by Wen et al.'s first-step score, then the extraction attack on the top 4, against the base
    scanned = 1000 if args.model == "sd15" else 100
    audit_dir = os.path.join(args.work_dir, "audit")
    precision = ["--mixed_precision", "bf16", "--resolution", "512"] if args.model == "sd15" else []
    phase("audit", lambda: subprocess.run(
        [sys.executable, "-m", "diffusers_memcontrol.cli", "audit", os.path.join(out, "final", "memcontrol-none"),
         "--max_train_samples", str(scanned + 200), "--dmem_size", str(scanned), "--scan", "--scan_top_k", "4",
         "--generations", "3", "--extraction_min_clique_size", "2", "--num_inference_steps", "2", *precision,
         "--output_dir", audit_dir, "--no_progress"], check=True, env=env))
    with open(os.path.join(audit_dir, "audit.json"), encoding="utf-8") as f:
        scan = json.load(f)["detection"]
    from diffusers_memcontrol.evaluation.reporting import (
        CEILING,  # the first row: real images through the VAE, not a fine-tune
    )

    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        rows = json.load(f)
    report = {"model": args.model, "gpus_per_trial": args.gpus_per_trial, "phases": phases,
              "total_wall_s": round(sum(p["wall_s"] for p in phases.values()), 1), "image_size": model["image_size"],
              "stage_two_rows": [f"{r['method']}-{r['mitigation']}" for r in rows if r["method"] != CEILING],
              "audit_scan": {"captions": scan["n_scanned"], "seconds": phases["audit"]["wall_s"],
                             "scan_seconds_per_1000_captions": scan["seconds_per_1000_captions"]},
              "device": _device()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
