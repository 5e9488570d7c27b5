"""A/B equality of two checkouts: the same fixed-seed fine-tunes, the adapters compared with torch.equal.

    python benchmarks/refactor_equality.py --old /path/to/old/checkout --new . --out benchmarks/results/refactor_equality.json

Each checkout trains every method (and a run with the step's optional draws: noise offset, input perturbation, SNR
weighting, random flips, caption dropout, the threshold mitigation) with `python -m diffusers_memcontrol.train` on the
tiny base and the digits, from its own source tree (PYTHONPATH), in a fresh cache folder. A refactor that claims
"behaviour unchanged" passes when every adapter tensor is bit-identical.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

COMMON = ["--max_train_steps", "3", "--max_train_samples", "48", "--train_batch_size", "8", "--seed", "0",
          "--dmem_size", "4", "--no_progress", "--num_validation_images", "0"]
RUNS = {
    "svdiff": ["--peft_method", "svdiff"],
    "difffit": ["--peft_method", "difffit"],
    "attention": ["--peft_method", "attention"],
    "lora": ["--peft_method", "lora"],
    "full": ["--peft_method", "full"],
    "svdiff-draws": ["--peft_method", "svdiff", "--noise_offset", "0.1", "--input_perturbation", "0.1",
                     "--snr_gamma", "5", "--random_flip", "--caption_dropout", "0.2", "--mitigation", "threshold",
                     "--threshold", "auto"],
}
WEIGHTS = ("adapter_model.safetensors", "unet/diffusion_pytorch_model.safetensors")  # an adapter; a full fine-tune


def train(tree: str, name: str, out: str, cache: str) -> str:
    """Run one fine-tune from `tree`'s sources; returns its output folder."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), MEMCONTROL_CACHE_DIR=cache, OMP_NUM_THREADS="1")
    folder = os.path.join(out, name)
    os.makedirs(out, exist_ok=True)
    subprocess.run([sys.executable, "-m", "diffusers_memcontrol.train", *COMMON, *RUNS[name], "--output_dir", folder],
                   check=True, env=env, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return folder


def weights_of(folder: str) -> dict[str, torch.Tensor]:
    """The adapter tensors a run saved."""
    for name in WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return load_file(os.path.join(folder, name))
    raise FileNotFoundError(f"no adapter weights in {folder}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="The checkout before the change.")
    p.add_argument("--new", default=".", help="The checkout after the change.")
    p.add_argument("--runs", default=",".join(RUNS), help="Comma-separated runs.")
    p.add_argument("--out", default=None, help="JSON file of the comparison.")
    args = p.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            sides = {side: weights_of(train(tree, name, os.path.join(tmp, side), os.path.join(tmp, side, "cache")))
                     for side, tree in (("old", args.old), ("new", args.new))}
            old, new = sides["old"], sides["new"]
            report[name] = {"tensors": len(new), "same_keys": sorted(old) == sorted(new),
                            "equal": sorted(old) == sorted(new) and all(torch.equal(old[k], new[k]) for k in old)}
            print(name, report[name], flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    sys.exit(0 if all(r["equal"] for r in report.values()) else 1)


if __name__ == "__main__":
    main()
