"""WIDER FACE val AP of our RetinaFace under each test-scale policy, next to the reference detections.

Runs the detector over the images (default: the 323 shared val images), evaluates with the official protocol
(facepipe.evaluation.widerface) and prints easy / medium / hard AP, detection time per image, and, when the
shared golden detections cover the images, the AP of the reference implementation on the same images.

    .venv/bin/python eval/widerface_ap.py                       # original size, all shared images
    .venv/bin/python eval/widerface_ap.py --scales original fixed --every 4
    .venv/bin/python eval/widerface_ap.py --images WIDER_val/images --gt wider_face_split --scales fixed

Timings are wall-clock on whatever else the machine is doing; rerun on a quiet machine for real figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from facepipe.detection import create_detector
from facepipe.evaluation import widerface as wider
from facepipe.io.images import list_images, read_image
from facepipe.types import faces_from_rows

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def reference_ap(keys: list[str], ground_truth: wider.WiderGroundTruth) -> wider.WiderResult | None:
    golden = SHARED / "golden" / "retinaface_mnet_shared.npz"
    if not golden.is_file():
        return None
    npz = np.load(golden)
    names = {wider.image_key(k): k for k in npz.files if k.startswith("widerface/")}
    if not all(k in names for k in keys):
        return None
    return wider.evaluate({k: wider.faces_to_rows(faces_from_rows(npz[names[k]])) for k in keys}, ground_truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED / "widerface" / "val_images")
    parser.add_argument("--gt", type=Path, default=SHARED / "widerface")
    parser.add_argument("--scales", nargs="+", choices=["original", "fixed", "multiscale"], default=["original"])
    parser.add_argument("--detector", default="retinaface")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--every", type=int, default=1, help="use every n-th image (sorted)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    ground_truth = wider.load_ground_truth(args.gt)
    paths = list_images(args.images)[:: args.every]
    keys = [wider.image_key(p) for p in paths]
    print(f"{len(paths)} images from {args.images}, torch threads {torch.get_num_threads()}")

    rows = []
    reference = reference_ap(keys, ground_truth)
    if reference is not None:
        rows.append(("reference (golden npz)", reference, float("nan")))
    for scale in args.scales:
        # score > 0.02 as in the reference WIDER test, so that the PR curve reaches low scores
        detector = create_detector(args.detector, weights=args.weights, threshold=0.02, scale=scale)
        predictions, seconds = {}, 0.0
        for path, key in tqdm(list(zip(paths, keys)), desc=scale, unit="img"):
            image = read_image(path)
            start = time.perf_counter()
            faces = detector.detect([image])[0]
            seconds += time.perf_counter() - start
            predictions[key] = wider.faces_to_rows(faces)
        rows.append((f"{args.detector} {scale}", wider.evaluate(predictions, ground_truth, images=keys), seconds / len(paths)))

    print(f"\n{'run':<28}{'easy':>9}{'medium':>9}{'hard':>9}{'ms/img':>10}")
    for name, result, per_image in rows:
        timing = "" if np.isnan(per_image) else f"{per_image * 1000:10.1f}"
        print(f"{name:<28}{result.ap['easy']:9.4f}{result.ap['medium']:9.4f}{result.ap['hard']:9.4f}{timing}")
    if reference is not None:
        for name, result, _ in rows[1:]:
            diff = [result.ap[s] - reference.ap[s] for s in wider.SETTINGS]
            print(f"{name} - reference: " + " / ".join(f"{d:+.6f}" for d in diff))
    return 0


if __name__ == "__main__":
    sys.exit(main())
