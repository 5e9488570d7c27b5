"""First vs second SV-DIFF injection on one machine: the SVD of every adapted weight, then the on-disk SVD cache.

    python benchmarks/svd_load.py            # tiny base (whole UNet) and the SD1.5 shape (one weight per shape)

The SD1.5 UNet has ~300 adapted weights in ~30 distinct shapes; SVD time depends only on the shape, so the SD1.5
figures time one random weight per shape (SVD, then the cache read), smallest shapes first within a time budget, and
extrapolate: measured shapes by their count, unmeasured ones by SVD cost ~ m*n*min(m, n) (cache reads ~ m*n) fitted on
the largest measured shape.
Writes `benchmarks/results/svd_load.json`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))
BUDGET_S = 120.0


def _tiny() -> dict:
    from diffusers import UNet2DConditionModel

    from diffusers_memcontrol import MemControlConfig
    from diffusers_memcontrol.data.tiny_base import tiny_base_path

    times = []
    for _ in range(2):
        unet = UNet2DConditionModel.from_pretrained(tiny_base_path(), subfolder="unet")
        t = time.perf_counter()
        unet.add_adapter(MemControlConfig(method="svdiff"))
        times.append(time.perf_counter() - t)
    return {"model": "tiny base UNet (all layers)", "first_injection_s": times[0], "second_injection_s": times[1]}


def _sd15() -> dict:
    from diffusers import UNet2DConditionModel
    from sd15 import SD15_UNET

    from diffusers_memcontrol import MaskSpace
    from diffusers_memcontrol.tuners.memcontrol.svd_cache import layer_svd

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    modules = dict(unet.named_modules())
    plan = MaskSpace.from_unet(unet, "svdiff", "blocks").module_roles(None, unet)
    shapes = Counter(tuple(modules[n].weight.shape) for n, roles in plan.items() if "spectral" in roles)
    first = second = 0.0
    per_shape = []
    start = time.perf_counter()
    ordered = sorted(shapes.items(), key=lambda kv: kv[0][0] * math.prod(kv[0][1:]))
    svd_rate = read_rate = None
    for shape, count in ordered:
        m, n = shape[0], math.prod(shape[1:])
        if time.perf_counter() - start < BUDGET_S:
            weight = torch.randn(shape)
            t = time.perf_counter()
            layer_svd(weight)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            layer_svd(weight)
            t2 = time.perf_counter() - t
            svd_rate, read_rate = t1 / (m * n * min(m, n)), t2 / (m * n)
            measured = True
        else:
            t1, t2, measured = svd_rate * m * n * min(m, n), read_rate * m * n, False
        first += count * t1
        second += count * t2
        per_shape.append({"shape": list(shape), "count": count, "svd_s": t1, "cache_read_s": t2, "measured": measured})
        print(f"{shape} x{count}: svd {t1:.2f} s, cache {t2:.3f} s{'' if measured else ' (extrapolated)'}", flush=True)
    return {"model": "SD1.5 UNet shape (random weights, one per shape, extrapolated by count)", "budget_s": BUDGET_S,
            "measured_shapes": sum(r["measured"] for r in per_shape),
            "adapted_weights": sum(shapes.values()), "distinct_shapes": len(shapes),
            "first_injection_s": first, "second_injection_s": second, "per_shape": per_shape}


def main() -> None:
    from diffusers_memcontrol.files import write_json_atomic

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MEMCONTROL_CACHE_DIR"] = cache  # a cold cache for this measurement
        rows = []
        for measure in (_tiny, _sd15):
            rows.append(measure())
            print(f"{rows[-1]['model']}: first {rows[-1]['first_injection_s']:.2f} s, "
                  f"second {rows[-1]['second_injection_s']:.2f} s", flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "svd_load.json")
    write_json_atomic(out, {"benchmark": "svd_load", "device": "cpu", "threads": 1,
                            "command": "python benchmarks/svd_load.py", "results": rows})
    print(f"written to {out}")


if __name__ == "__main__":
    main()
