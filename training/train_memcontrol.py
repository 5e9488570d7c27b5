"""Fine-tune a Stable Diffusion UNet with a MemControl adapter (a PEFT method restricted by a mask), then evaluate it.

The diffusers-style example around the installed trainer `diffusers_memcontrol.train` (the same flags; the search runs
it as `python -m diffusers_memcontrol.train`). It extends diffusers' examples/text_to_image/train_text_to_image.py:
the model, data and optimisation arguments keep their names and meanings (docs/flags.md); MemControl adds the PEFT
method and its mask, mitigations (RWA, threshold), the memorization set D_mem and the HPO training set, a
latent/text-embedding cache, and the evaluation.

    accelerate launch training/train_memcontrol.py                          # embedded default: tiny base + digits
    accelerate launch training/train_memcontrol.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir /data/mimic_cxr/train.csv --image_column path --caption_column report \\
        --subject_column subject_id --resolution 512 --center_crop \\
        --peft_method svdiff --mask_layout paper --mask 1011010110111 --output_dir out/svdiff --eval
    python training/train_memcontrol.py --eval --adapter_dir out/svdiff      # evaluate a trained adapter only
    python training/train_memcontrol.py --search ...                          # the whole method (stage 1 + 2)
    python training/train_memcontrol.py --preset quickstart                   # README's quickstart (prints its flags)

Outputs (output_dir): the adapter in peft format (adapter_config.json, adapter_model.safetensors, mask.json; with
--peft_method full, the pipeline in diffusers' save_pretrained layout and mask.json), training_config.json,
summary.json, validation.png, metrics.json (with --eval), checkpoint-<step>/ folders and tracker logs. Captions and
prompts are never written to any JSON file or log. A user's mistake ends the run with one line `error: ...` and exit
status 2 (docs/errors.md).
"""

import sys

from diffusers_memcontrol.errors import run_command
from diffusers_memcontrol.search.arguments import expand_preset, runs_whole_method
from diffusers_memcontrol.search.stages import main_search
from diffusers_memcontrol.train import main as train_one


def main(argv: list[str] | None = None) -> dict:
    """One fine-tune (diffusers_memcontrol.train), or the whole method with --search / --final --mask MASK."""
    argv = expand_preset(sys.argv[1:] if argv is None else list(argv))
    if runs_whole_method(argv) or {"-h", "--help"} & set(argv):
        return main_search(argv)  # --help lists the trainer's flags and the search's  # stage 1 and/or stage 2 and the table: diffusers_memcontrol.search.stages
    return train_one(argv)


if __name__ == "__main__":
    run_command(main)
