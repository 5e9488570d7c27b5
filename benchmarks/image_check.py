"""Images per second of the pre-flight image check (`images.check_images`: every image decoded in full).

    python benchmarks/image_check.py                          # 10,000 PNGs of 64x64 (RGB noise)
    python benchmarks/image_check.py --count 1000 --size 512  # 1,000 PNGs of 512x512

Writes the PNGs to a temporary folder (noise: the worst case for PNG's compression, so the slowest to decode), then
times the check with 1 and 2 threads (no cache: every image decoded), a first run through the file-hash memo (decode
+ remember) and its rerun (nothing decoded: what a rerun or another search worker pays).
Writes `benchmarks/results/image_check_<count>x<size>px.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_pngs(folder: str, count: int, size: int, seed: int = 0) -> list[str]:
    """`count` PNGs of `size` x `size` RGB noise in `folder`; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"img{i:05d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def timed(fn) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from datasets import Dataset, Features, Image

    from diffusers_memcontrol.cache import FileHashMemo
    from diffusers_memcontrol.data.images import check_images

    with tempfile.TemporaryDirectory() as tmp:
        made, paths = timed(lambda: make_pngs(tmp, args.count, args.size))
        dataset = Dataset.from_dict({"image": paths}, features=Features({"image": Image()}))
        megabytes = sum(os.path.getsize(p) for p in paths) / 2**20
        runs = {}
        for workers in (1, 2):
            seconds, result = timed(lambda: check_images(dataset, "image", workers=workers, progress=False))
            assert not result.bad and result.decoded == args.count
            runs[f"decode_{workers}_worker{'s' if workers > 1 else ''}"] = {
                "seconds": round(seconds, 2), "images_per_s": round(args.count / seconds, 1)}
        memo = FileHashMemo(os.path.join(tmp, "cache", "file_hashes.sqlite"))
        for name in ("first_run_with_cache_2_workers", "cached_rerun_2_workers"):
            seconds, result = timed(lambda: check_images(dataset, "image", memo=memo, workers=2, progress=False))
            runs[name] = {"seconds": round(seconds, 2), "images_per_s": round(args.count / seconds, 1),
                          "decoded": result.decoded, "known_good_from_cache": result.cached}
        memo.close()
    record = {
        "benchmark": "pre-flight image check (images.check_images: full decode + RGB conversion + SHA-256)",
        "command": f"python benchmarks/image_check.py --count {args.count} --size {args.size}",
        "images": args.count, "image": f"{args.size}x{args.size} RGB noise PNG", "dataset_mb": round(megabytes, 1),
        "make_pngs_s": round(made, 1), "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "note": ("run once, briefly, on a 2-core machine shared with other jobs: a noisy figure, not a tight one; "
                 "2 workers are threads (PIL and hashlib release the GIL while decoding and hashing)"),
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"image_check_{args.count}x{args.size}px.json")
    from diffusers_memcontrol.files import write_json_atomic

    write_json_atomic(out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
