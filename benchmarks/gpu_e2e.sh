#!/usr/bin/env bash
# MemControl end to end on one GPU (README "Many GPUs, many machines"): an SD1.5-shaped UNet with random weights at
# 512 px, bf16 and gradient checkpointing; a 2-trial search (stage 1), stage 2 for two rows (freeze, memcontrol),
# `memcontrol publish --dry_run`, `pipe.load_memcontrol_adapter` and one generation, and `memcontrol audit --scan` of
# the MemControl row (1,000 captions scanned in bf16: `audit_scan.scan_seconds_per_1000_captions`). Writes wall time
# per phase and peak GPU memory to JSON. Sized to finish in under 8 minutes on one H200.
# Usage: OUT=benchmarks/results bash benchmarks/gpu_e2e.sh [--model tiny (CPU, tiny base)] [--gpus_per_trial K]
set -euo pipefail
OUT=${OUT:-benchmarks/results}
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
python3 -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
MODEL=sd15
for arg in "$@"; do [ "$arg" = tiny ] && MODEL=tiny; done
python3 benchmarks/gpu_e2e.py --output "$OUT/gpu_e2e_$MODEL.json" "$@"
