"""The `memcontrol` command: inspect mask spaces, fine-tune, search, transfer a mask, publish."""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffusers import UNet2DConditionModel

from .audit.command import EXTRACTION_EXIT_STATUS
from .audit.command import main as audit_main
from .data.tiny_base import tiny_base_path
from .errors import ArgumentParser, run_command, user_input
from .hub.publish import publish
from .search.arguments import expand_preset
from .search.stages import main_search
from .train import main as train_one
from .tuners import MaskSpace
from .tuners.memcontrol.builtin_masks import builtin_masks


def _mask_space(args: argparse.Namespace) -> int:
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path or tiny_base_path(),
                                                subfolder="unet")
    space = MaskSpace.from_unet(unet, method=args.peft_method, layout=args.mask_layout)
    mask = space.mask(args.mask) if args.mask else space.full()
    report = {
        **space.to_dict(),
        "bits": list(mask.bits),
        "trainable_params": space.count_trainable(mask, unet, scope=args.mask_scope),
        "unet_params": sum(p.numel() for p in unet.parameters()),
    }
    print(json.dumps(report, indent=2))
    return 0


def _masks(args: argparse.Namespace) -> int:
    masks = [m.to_dict() for m in builtin_masks().values()]
    if args.json:
        print(json.dumps(masks, indent=2))
        return 0
    for m in masks:
        share = 100 * m["trainable_params"] / m["unet_params"]
        print(f"{m['name']}\n  source: {m['source']}\n  method: {m['method']}, layout: {m['layout']}, scope: "
              f"{m['scope']}\n  trainable: {m['trainable_params']:,} of {m['unet_params']:,} UNet parameters "
              f"({share:.4f}%) on {m['base_model']}\n  bits: {m['bitstring']}\n  {m['description']}\n")
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    train_one(rest)
    return 0


def _publish(args: argparse.Namespace) -> int:
    if args.audit:  # the audit's figures go into the model card (hub.py); its images stay local
        audit_args = [args.output_dir, "--output_dir", os.path.join(args.output_dir, "audit"), *args.audit_args]
        status = audit_main([*audit_args, "--fail_on_extraction"] if args.fail_on_extraction else audit_args)
        if status == EXTRACTION_EXIT_STATUS:
            print("error: the audit extracted training images; nothing was published (see audit/audit.md)",
                  file=sys.stderr)
            return status
    with user_input(catch=(ValueError, FileNotFoundError, FileExistsError)):  # a refused folder: one error line
        where = publish(args.output_dir, args.repo_id, private=not args.public, token=args.hub_token,
                        revision=args.revision, include_adapter=not args.mask_only,
                        include_samples=args.include_samples, dry_run=args.dry_run, local_dir=args.local_dir,
                        endpoint=args.endpoint)
    print(f"published to {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memcontrol` console script (a user's mistake: one `error: ...` line, exit status 2)."""
    return run_command(_run, argv)


def _run(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="memcontrol", description="MemControl for diffusers: memorization-aware "
                                     "parameter-efficient fine-tuning of Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    space = sub.add_parser("mask-space", help="List the mask positions of a UNet and count trainable parameters.")
    space.add_argument("--pretrained_model_name_or_path", default=None, help="Default: the shipped tiny base.")
    space.add_argument("--peft_method", default="svdiff")
    space.add_argument("--mask_layout", default="blocks")
    space.add_argument("--mask_scope", default="reference")
    space.add_argument("--mask", default=None, help="Bit string; default all ones.")
    listing = sub.add_parser("masks", help="List the built-in masks (use one with --mask memcontrol:NAME).")
    listing.add_argument("--json", action="store_true", help="Print the list as JSON.")
    pub = sub.add_parser("publish", help="Publish a mask (and adapter) with a model card to the Hub.")
    pub.add_argument("output_dir", help="A training or search output folder.")
    pub.add_argument("--repo_id", required=True, help="ORG/NAME on the Hub.")
    pub.add_argument("--public", action="store_true", help="Create a public repo (default: private).")
    pub.add_argument("--mask_only", action="store_true", help="Publish the mask without the adapter weights.")
    pub.add_argument("--include_samples", action="store_true",
                     help="Also publish sample images/texts of output_dir (never done by default: privacy).")
    pub.add_argument("--dry_run", action="store_true", help="Write the repo folder to --local_dir, upload nothing.")
    pub.add_argument("--local_dir", default=None)
    pub.add_argument("--hub_token", default=None)
    pub.add_argument("--revision", default=None)
    pub.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co).")
    pub.add_argument("--audit", action="store_true",
                     help="Run `memcontrol audit` on output_dir first and put its figures (never images) in the card.")
    pub.add_argument("--fail_on_extraction", action="store_true",
                     help="With --audit: publish nothing (exit 3) when the audit extracts a training image.")
    pub.add_argument("--audit_args", nargs=argparse.REMAINDER, default=[],
                     help="Flags passed to `memcontrol audit` (last on the command line), e.g. --scan.")
    sub.add_parser("search", help="Run MemControl: search masks, final fine-tunes and the comparison table (same "
                   "arguments as training/train_memcontrol.py --search; `--preset quickstart`: README's quickstart).",
                   add_help=False)
    sub.add_parser("transfer", help="Stage 2 and the table with a mask found elsewhere, no search (same arguments "
                   "as training/train_memcontrol.py --final --mask MASK).", add_help=False)
    sub.add_parser("train", help="Fine-tune with a mask (same arguments as python -m diffusers_memcontrol.train).",
                   add_help=False)
    sub.add_parser("audit", help="Measure the memorization of any fine-tune (MemControl run or adapter, LoRA, UNet, "
                   "pipeline) against its base; see `memcontrol audit --help` and docs/audit.md.", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        return _train(args, rest)
    if args.command == "audit":
        return audit_main(rest)
    if args.command in ("search", "transfer"):
        main_search(["--search" if args.command == "search" else "--final", *expand_preset(rest)])
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "masks":
        return _masks(args)
    return _publish(args) if args.command == "publish" else _mask_space(args)


if __name__ == "__main__":
    sys.exit(main())
