"""Training speed and accuracy on real photos: Ursa's default recipe against a linear probe and a plain
fine-tune loop, all in the same run, on ../shared/data/monkey10 (full set and its 10-shot subset).

Prints one JSON line per contender: {"benchmark", "subset", "contender", "error_rate", "wall_s", ...}.
Every contender starts cold (no feature cache). Usage:
    python benchmarks/train_speed.py [--data ../shared/data/monkey10] [--skip-finetune] [--subset full|10shot|both]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "monkey10"))
    ap.add_argument("--subset", default="both", choices=["full", "10shot", "both"])
    ap.add_argument("--skip-finetune", action="store_true", help="skip the (slow) plain fine-tune baseline")
    ap.add_argument("--ursa-fine-tune", type=int, default=3, help="epochs for the Ursa --fine-tune contender on 10-shot")
    args = ap.parse_args()

    from ursa.train.runtime import tune_allocator

    tune_allocator()
    import torch

    torch.set_num_threads(2)
    from ursa.config import DataConfig, TrainConfig
    from ursa.data.split import Split, build_split

    root = Path(args.data)
    if not root.is_dir():
        print(json.dumps({"benchmark": "train_speed", "skipped": f"{root} not found"}))
        return
    full = build_split(root, DataConfig(train="training", valid="validation"))
    by = defaultdict(list)
    for it in full.train:
        by[it.label].append(it)
    shot = Split(root, sorted(it for c in sorted(by) for it in sorted(by[c])[:10]), full.valid, full.classes, [], "folders", 42, 0.0)
    subsets = {"full": full, "10shot": shot}
    chosen = ["full", "10shot"] if args.subset == "both" else [args.subset]
    load = os.getloadavg()[0]

    def emit(**kw: object) -> None:
        print(json.dumps({"benchmark": "train_speed", "threads": 2, "load_average_1min": round(load, 2), **kw}), flush=True)

    for name in chosen:
        sp = subsets[name]
        # --- Ursa default recipe (cold cache) ---
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["URSA_CACHE_DIR"] = tmp
            from ursa.train.recipe import train_run

            t = time.perf_counter()
            r = train_run(root, Path(tmp) / "run", data=DataConfig(train="training", valid="validation"), train=TrainConfig(), split=sp, progress=False)
            emit(subset=name, contender="ursa_default", error_rate=round(r.metrics["error_rate"], 4), wall_s=round(time.perf_counter() - t, 1), feature_s=r.metrics["feature_s"], views=len(r.metrics["views"]), n_train=r.metrics["n_train"])
            if name == "10shot" and args.ursa_fine_tune:
                t = time.perf_counter()
                r2 = train_run(root, Path(tmp) / "run_ft", data=DataConfig(train="training", valid="validation"), train=TrainConfig(fine_tune=args.ursa_fine_tune), split=sp, progress=False)
                emit(subset=name, contender=f"ursa_fine_tune_{args.ursa_fine_tune}", error_rate=round(r2.metrics["error_rate"], 4), wall_s=round(time.perf_counter() - t, 1), note="feature cache warm from the default run")
        # --- linear probe: frozen features at 224 px + scikit-learn logistic regression ---
        t = time.perf_counter()
        err = linear_probe(sp)
        emit(subset=name, contender="linear_probe", error_rate=round(err, 4), wall_s=round(time.perf_counter() - t, 1))
        # --- plain fine-tune loop: all layers, AdamW, 4 epochs, 224 px ---
        if not args.skip_finetune:
            t = time.perf_counter()
            err = plain_finetune(sp, epochs=4)
            emit(subset=name, contender="plain_finetune_4ep", error_rate=round(err, 4), wall_s=round(time.perf_counter() - t, 1))


def _features(model, tf, root: Path, items) -> "np.ndarray":  # noqa: ANN001
    import numpy as np
    import torch

    from ursa.data.transforms import open_image

    out = []
    with torch.inference_mode():
        for i in range(0, len(items), 32):
            x = torch.stack([tf(open_image(root / it.name)) for it in items[i : i + 32]])
            out.append(model(x).numpy())
    return np.concatenate(out)


def linear_probe(sp) -> float:  # noqa: ANN001
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from ursa.data.transforms import eval_transform
    from ursa.models import create_backbone

    bb = create_backbone("efficientnet_lite0")
    tf = eval_transform(bb.data_config)
    m = bb.model.eval()
    xtr, xva = _features(m, tf, sp.root, sp.train), _features(m, tf, sp.root, sp.valid)
    clf = LogisticRegression(max_iter=3000).fit(xtr, sp.label_ids(sp.train))
    return float(np.mean(clf.predict(xva) != sp.label_ids(sp.valid)))


def plain_finetune(sp, *, epochs: int) -> float:  # noqa: ANN001
    import torch
    from torch import nn

    from ursa.data.loaders import ImageDataLoaders
    from ursa.models import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0")
    model = nn.Sequential(bb.model, nn.Linear(bb.num_features, len(sp.classes)))
    dls = ImageDataLoaders.from_split(sp, bb.data_config, bs=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    for _ in range(epochs):
        model.train()
        for x, y in dls.train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    wrong = n = 0
    with torch.inference_mode():
        for x, y in dls.valid:
            wrong += int((model(x).argmax(-1) != y).sum())
            n += len(y)
    return wrong / max(1, n)


if __name__ == "__main__":
    sys.exit(main())
