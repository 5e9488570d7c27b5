#!/usr/bin/env bash
# SD1.5-shaped peft_step benchmarks on a CUDA machine (the figures in README's GPU table).
# Usage: OUT=results_dir bash benchmarks/gpu_sd15.sh
set -u
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
python3 benchmarks/peft_step.py --model sd15 --device cuda --latent_size 16 --batch_size 1 --steps 5 \
  --output "$OUT/peft_step_sd15_cuda_latent16_b1.json"
python3 benchmarks/peft_step.py --model sd15 --device cuda --latent_size 64 --batch_size 4 --steps 5 \
  --output "$OUT/peft_step_sd15_cuda_latent64_b4.json"
