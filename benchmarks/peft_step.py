"""Training-step time and peak memory of every MemControl method against full fine-tuning and peft's LoRA.

Each configuration runs in its own subprocess so that its peak memory (CUDA max allocated, or CPU peak RSS) is its own.
All configurations of one invocation run on the same machine, model and input size, and ratios are taken against the
baselines measured in that same invocation.

    python benchmarks/peft_step.py --model tiny                 # the shipped tiny base, CPU
    python benchmarks/peft_step.py --model sd15 --steps 3       # SD1.5-shaped UNet (random init), 16x16 latent, batch 1
    python benchmarks/peft_step.py --model sd15 --device cuda --latent_size 64 --batch_size 4
    python benchmarks/peft_step.py --model sd15 --device cuda --mixed_precision bf16 --gradient_checkpointing

`--mixed_precision bf16` trains as the trainer does: frozen weights in bf16, trainable tensors in fp32, the step under
`torch.autocast(bf16)`. `--fake_svd` replaces SV-DIFF's SVD by random factors of the same shapes (in a throw-away SVD
cache): step time and memory depend only on the shapes, and the SD1.5 SVD takes ~25 minutes on one CPU thread.

Writes `benchmarks/results/peft_step_<model>_<device>_latent<N>_b<batch>[_bf16][_gc].json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS = [
    # name, method, mask fraction (None = not a MemControl adapter)
    ("full-ft", "baseline-full", None),
    ("peft-lora-r4", "baseline-lora", None),
    ("svdiff", "svdiff", 1.0),
    ("svdiff-half", "svdiff", 0.5),
    ("svdiff-always-rebuild", "svdiff-rebuild", 1.0),
    ("difffit", "difffit", 1.0),
    ("difffit-half", "difffit", 0.5),
    ("attention", "attention", 1.0),
    ("attention-half", "attention", 0.5),
    ("lora-masked", "lora", 1.0),
    ("lora-masked-half", "lora", 0.5),
]

from sd15 import SD15_UNET

from diffusers_memcontrol.files import write_json_atomic


def _build_unet(model: str, device):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        with torch.device(device):  # initialise in place: no 3.4 GB host-to-device copy per configuration
            return UNet2DConditionModel(**SD15_UNET)
    from diffusers_memcontrol.data.tiny_base import tiny_base_path

    return UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet").to(device)


def _apply(unet, method: str, fraction: float | None):
    from peft import LoraConfig

    from diffusers_memcontrol import MaskSpace, MemControlConfig
    from diffusers_memcontrol.tuners.memcontrol.layer import MemControlLayer

    if method == "baseline-full":
        unet.requires_grad_(True)
        return
    if method == "baseline-lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        return
    if method == "svdiff-rebuild":
        method = "svdiff"
        MemControlLayer._use_factored = lambda self, tokens: False  # the reference's per-forward weight rebuild
    space = MaskSpace.from_unet(unet, method, "blocks")
    # a half mask alternates, so that both shallow (wide-activation) and deep blocks are represented
    bits = [1] * len(space) if fraction >= 1 else [1 - i % 2 for i in range(len(space))]
    unet.add_adapter(MemControlConfig(method=method, mask=space.mask(bits)))


def _fake_svd() -> None:
    """Random factors of the shapes `torch.linalg.svd` would return (timing only; never written to the real cache)."""
    import tempfile

    import torch

    os.environ["MEMCONTROL_CACHE_DIR"] = tempfile.mkdtemp(prefix="fake_svd_")

    def fake(a, full_matrices=True):
        m, n = a.shape[-2:]
        k = min(m, n)
        return (torch.randn(m, k, device=a.device), torch.rand(k, device=a.device) + 0.1,
                torch.randn(k, n, device=a.device))

    torch.linalg.svd = fake


def run_single(args) -> dict:
    """Build, adapt and time one configuration (runs inside the subprocess)."""
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    if args.fake_svd:
        _fake_svd()
    name, method, fraction = next(c for c in CONFIGS if c[0] == args.single)
    device = torch.device(args.device)
    unet = _build_unet(args.model, device)
    t0 = time.perf_counter()
    _apply(unet, method, fraction)  # on the device: SV-DIFF's one-off SVD runs there
    setup_s = time.perf_counter() - t0
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    for p in unet.parameters():  # as the trainer: trainable tensors in fp32, the frozen rest in the compute dtype
        p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cross_dim = unet.config.cross_attention_dim
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch_size, unet.config.in_channels, args.latent_size, args.latent_size)
    latents = torch.randn(shape, generator=generator).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    text = torch.randn(args.batch_size, 77, cross_dim, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(latents, timesteps, text).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "cuda_max_allocated_gib"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_kind = "cpu_peak_rss_gib"
    times.sort()
    return {
        "config": name,
        "trainable_params": trainable,
        "setup_s": round(setup_s, 3),
        "step_s_median": times[len(times) // 2],
        "step_s_all": times,
        "peak_memory_gib": peak,
        "peak_memory_kind": peak_kind,
    }


def _write_report(args, results: list[dict]) -> str:
    """Add ratios against the baselines of this run and write the JSON atomically; return its path."""
    by_name = {r["config"]: r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            continue
        for base in ("full-ft", "peft-lora-r4"):
            if base in by_name:
                r[f"time_vs_{base}"] = r["step_s_median"] / by_name[base]["step_s_median"]
                r[f"memory_vs_{base}"] = r["peak_memory_gib"] / by_name[base]["peak_memory_gib"]

    device_name = args.device
    try:
        import torch

        if args.device.startswith("cuda"):
            device_name = torch.cuda.get_device_name(0)
    except Exception:
        pass
    report = {
        "benchmark": "peft_step",
        "model": args.model,
        "device": device_name,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "latent_size": args.latent_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fake_svd": args.fake_svd,
        "command": " ".join(["python", "benchmarks/peft_step.py"] + sys.argv[1:]),
        "results": results,
    }
    out = args.output or os.path.join(
        os.path.dirname(__file__), "results",
        f"peft_step_{args.model}_{args.device.split(':')[0]}_latent{args.latent_size}_b{args.batch_size}"
        f"{'_bf16' if args.mixed_precision == 'bf16' else ''}{'_gc' if args.gradient_checkpointing else ''}.json",
    )
    write_json_atomic(out, report)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent_size", type=int, default=None, help="default: 8 (tiny) / 16 (sd15)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 64 (tiny) / 1 (sd15)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fake_svd", action="store_true", help="random SV-DIFF factors (timing only)")
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--output", default=None)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.latent_size = args.latent_size or (8 if args.model == "tiny" else 16)
    args.batch_size = args.batch_size or (64 if args.model == "tiny" else 1)

    if args.single:
        print("RESULT " + json.dumps(run_single(args)))
        return

    results = []
    wanted = args.configs.split(",")
    for name, _, _ in CONFIGS:
        if name not in wanted:
            continue
        cmd = [sys.executable, __file__, "--single", name] + [
            f"--{k}={v}" for k, v in vars(args).items()
            if k not in ("single", "configs", "output", "gradient_checkpointing", "fake_svd") and v is not None
        ] + [f"--{flag}" for flag in ("gradient_checkpointing", "fake_svd") if getattr(args, flag)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            results.append({"config": name, "error": proc.stderr.strip().splitlines()[-1:] or ["no output"]})
            print(f"{name}: FAILED {results[-1]['error']}", file=sys.stderr)
            continue
        results.append(json.loads(line[len("RESULT "):]))
        _write_report(args, results)  # partial results survive an interrupted run
        print(f"{name}: {results[-1]['step_s_median']:.3f} s/step, {results[-1]['peak_memory_gib']:.2f} GiB",
              file=sys.stderr)

    out = _write_report(args, results)
    device_name = json.load(open(out))["device"]

    print(f"\n{args.model} on {device_name}, latent {args.latent_size}x{args.latent_size}, batch {args.batch_size}\n")
    print("| config | trainable | s/step | peak GiB | time vs LoRA | mem vs LoRA | time vs full FT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | failed | | | | | |")
            continue
        print(f"| {r['config']} | {r['trainable_params']:,} | {r['step_s_median']:.3f} | {r['peak_memory_gib']:.2f} | "
              f"{r.get('time_vs_peft-lora-r4', float('nan')):.2f} | {r.get('memory_vs_peft-lora-r4', float('nan')):.2f} | "
              f"{r.get('time_vs_full-ft', float('nan')):.2f} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
