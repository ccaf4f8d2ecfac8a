"""End-to-end latency of one photo through `ursa` predict, against the same model in PyTorch eager, in one run.

One 500x375 JPEG (a monkey10 validation photo resized to 500x375, written to a temporary file), 2 threads.
Each run reads the file, decodes, preprocesses and runs the model:

- ursa: `load_model(export, threads=2).predict_image(path)` (Pillow decode with draft, Pillow + numpy
  preprocessing, ONNX Runtime with all graph optimizations);
- eager: training's path, `open_image` + torchvision `eval_transform` + the same weights in PyTorch eager
  (`torch.inference_mode`, 2 threads), softmax.

Runs alternate in blocks of 10 (10 ursa, 10 eager, ...) so machine noise hits both alike, with a 50 ms
pause between blocks so neither contender's idle, still-spinning threads run during the other's block:
20 warm-up runs each, then 200 each. Prints one JSON line with median and p99 in milliseconds and the speed-up. The model comes from
`--model` (an export folder) or is exported from `--run` (default /tmp/m10run, made by
`ursa train /work/shared/data/monkey10 --train training --valid validation --out /tmp/m10run`).
`--precision int8` runs ursa's int8 model instead (`export --int8`; not the same model as eager's, so
max_abs_prob_diff then shows the quantization's effect on this photo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _model import DATA, add_model_args, model_folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=10, help="runs per contender before switching (default 10)")
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="ursa's model: fp32 (default) or int8 (needs an export made with --int8; --run exports one)")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from ursa.imageio import eval_min_side
    from ursa.data.transforms import eval_transform, open_image
    from ursa.export import load_model

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ursa-bench-"))
    model_dir = model_folder(args, tmp, int8=args.precision == "int8")
    if model_dir is None:
        return 2

    photo = tmp / "photo.jpg"
    src = sorted((DATA / "validation").rglob("*.jpg"))[0]
    Image.open(src).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(photo, quality=90)

    ursa_model = load_model(model_dir, threads=args.threads, precision=args.precision)
    eager = load_model(model_dir, backend="torch")._torch  # the same weights as an nn.Module
    dc = dict(ursa_model.data_config)
    tf = eval_transform(dc)
    side = eval_min_side(dc)  # the predictor's JPEG draft limit

    def run_ursa() -> np.ndarray:
        return ursa_model.predict_image(photo).probs

    def run_eager() -> np.ndarray:
        with torch.inference_mode():
            x = tf(open_image(photo, min_side=side)).unsqueeze(0)
            return eager(x).softmax(-1)[0].numpy()

    diff = float(np.abs(run_ursa() - run_eager()).max())
    times: dict[str, list[float]] = {"ursa": [], "eager": []}
    cpu: dict[str, list[float]] = {"ursa": [], "eager": []}
    # Blocks of `block` runs, alternating contenders, so machine noise hits both alike; a pause between
    # blocks lets the previous contender's idle threads stop spinning (PyTorch's OpenMP workers and ONNX
    # Runtime's pool both busy-wait for a while after a run) so they do not steal the other's cores.
    for b in range((20 + args.runs) // args.block):
        for name, fn in (("ursa", run_ursa), ("eager", run_eager)):
            time.sleep(0.05)
            for _ in range(args.block):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                if b * args.block >= 20:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name].append((time.process_time() - c0) * 1e3)

    def stats(name: str) -> dict[str, float]:
        v = times[name]
        # cpu_median: CPU time of all the process's threads per image, less sensitive to other load than wall time
        return {"median": round(float(np.median(v)), 2), "p99": round(float(np.percentile(v, 99)), 2), "min": round(min(v), 2), "cpu_median": round(float(np.median(cpu[name])), 2)}

    u, e = stats("ursa"), stats("eager")
    speedup = round(e["median"] / u["median"], 2)
    out = {
        "benchmark": "predict_latency",
        "image": "500x375 JPEG (monkey10 validation photo), file -> probabilities",
        "threads": args.threads,
        "runs": args.runs,
        "precision": args.precision,
        "ursa_onnxruntime_ms": u,
        "eager_pytorch_ms": e,
        "speedup_median": speedup,
        "max_abs_prob_diff": diff,
        "target": {"median_ms": 12, "speedup": 2.5},
        "met": bool(args.precision == "fp32" and u["median"] <= 12 and speedup >= 2.5),  # the target is for the same model as eager
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
