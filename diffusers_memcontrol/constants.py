"""The file and folder names the package reads and writes, each defined once."""

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ASSETS_DIR = os.path.join(PACKAGE_DIR, "assets")

# an adapter folder (peft's names, plus the mask)
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MASK_FILE = "mask.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA format (save_lora_weights)

# a diffusers pipeline folder (`save_pretrained`): what a `full` fine-tune writes, beside its run files
PIPELINE_INDEX_FILE = "model_index.json"
UNET_FOLDER = "unet"  # the UNet of a pipeline folder, and of a `full` fine-tune's checkpoint-<step>/

# a fine-tune's output folder
TRAINING_CONFIG_FILE = "training_config.json"  # the trainer's arguments, without private values
SUMMARY_FILE = "summary.json"  # the run's summary: publish adds `hub_url` to it
METRICS_FILE = "metrics.json"
VALIDATION_IMAGE = "validation.png"
SKIPPED_IMAGES_FILE = "skipped_images.json"  # rows --skip_bad_images dropped: split, row, file, reason
TRIAL_RESULT_FILE = "trial_result.json"  # written last: marks a finished run
RUN_ARGS_FILE = "run_args.json"  # a search row's trainer arguments (digest and public argv): never published
DMEM_GENERATIONS_FILE = "dmem_generations.safetensors"  # D_mem generations: local only, never published
MEMORIZATION_FIGURE = "memorization.png"  # shows training images: local only, never published

# a search's output folder
BEST_MASK_FILE = "best_mask.json"
PARETO_FILE = "pareto.json"
PARETO_FIGURE = "pareto.png"
TRIALS_FILE = "trials.csv"
STUDY_FILE = "study.db"
SEARCH_SUMMARY_FILE = "search_summary.json"
RESULTS_MARKDOWN = "results.md"
RESULTS_JSON = "results.json"

# the audit and the Hub
AUDIT_FILE = "audit.json"
AUDIT_REPORT = "audit.md"
CARD_FILE = "README.md"
