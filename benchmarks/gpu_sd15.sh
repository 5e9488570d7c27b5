#!/usr/bin/env bash
# SD1.5-shaped peft_step benchmarks on a CUDA machine (the figures in README's GPU table), about 10 minutes on an H200.
# fp32 and bf16 (the trainer's --mixed_precision bf16), gradient checkpointing off and on; the SVD cache makes every
# SV-DIFF configuration after the first skip the SVD.
# Usage: OUT=results_dir bash benchmarks/gpu_sd15.sh
set -u
OUT=${OUT:-benchmarks/results}
MAIN=full-ft,peft-lora-r4,svdiff,svdiff-half,difffit,attention,lora-masked
ALL=$MAIN,svdiff-always-rebuild,difffit-half,attention-half,lora-masked-half
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
python3 benchmarks/peft_step.py --model sd15 --device cuda --latent_size 16 --batch_size 1 --steps 5 \
  --output "$OUT/peft_step_sd15_cuda_latent16_b1.json"
for precision in no bf16; do
  suffix=$([ "$precision" = bf16 ] && echo _bf16)
  configs=$([ "$precision" = bf16 ] && echo "$MAIN" || echo "$ALL")
  python3 benchmarks/peft_step.py --model sd15 --device cuda --latent_size 64 --batch_size 4 --steps 5 \
    --mixed_precision "$precision" --configs "$configs" --output "$OUT/peft_step_sd15_cuda_latent64_b4$suffix.json"
  python3 benchmarks/peft_step.py --model sd15 --device cuda --latent_size 64 --batch_size 4 --steps 5 \
    --mixed_precision "$precision" --gradient_checkpointing --configs full-ft,peft-lora-r4,svdiff,difffit \
    --output "$OUT/peft_step_sd15_cuda_latent64_b4${suffix}_gc.json"
done
