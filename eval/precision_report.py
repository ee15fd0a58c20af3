"""Accuracy and speed of reduced precision (bf16 on OpenVINO, calibrated int8 on onnxruntime) against fp32.

Per model and precision, in one process on this CPU (its model and flags are printed first):

* embedders (bundled MobileFaceNet, the shared faceplugin 512-d ONNX): CFP-FF / CFP-FP accuracy, 10-fold over
  the pairs of the chosen official splits (``--splits``; all ten = the full protocol), on crops detected by
  fp32 RetinaFace and aligned once; the cosine between the fp32 and reduced-precision embeddings of those crops
  (min / mean); and images/s against onnxruntime fp32 (batch 32, no flip, ``--threads``), round robin, median;
* iresnet100 (random weights: no released weights are here; speed does not depend on them): speed only;
* RetinaFace-mnet: WIDER AP (easy / medium / hard) on the shared val images at original size, and full
  ``detect()`` time on a 640x480 image with 1 thread.

int8 is calibrated on crops of ``images/celebrities`` (detected and aligned here), people who are not in CFP.
Goals (issue 14): verification within 0.2 pt, AP within 0.003, speed >= 2x for iresnet100 and MobileFaceNet
embedding, >= 1.5x for RetinaFace detect() at VGA with 1 thread.

    FACEPIPE_HOME=/tmp/fp .venv/bin/python eval/precision_report.py --splits 1,2 --json report.json
    .venv/bin/python eval/precision_report.py --quick     # speed and cosines only, no CFP/WIDER accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from facepipe.alignment.similarity import norm_crop
from facepipe.detection.base import create_detector
from facepipe.embedding.base import create_embedder
from facepipe.embedding.onnx_embedder import OnnxEmbedder, export_onnx
from facepipe.evaluation import widerface as wider
from facepipe.evaluation.protocols import read_cfp_pairs
from facepipe.evaluation.raw_pipeline import center_crop_fallback, choose_face
from facepipe.evaluation.verification import evaluate_distances, normalize_rows, pair_distances
from facepipe.io.images import list_images, read_image
from facepipe.models.registry import create_model, get_config
from facepipe.runtime.cpu import cpu_summary, unsupported_reason

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
PRECISIONS = ("fp32", "bf16", "int8")


def aligned_crops(paths: list[Path], detector) -> tuple[np.ndarray, int]:
    """One 112x112 crop per image (main face; insightface's centre crop when none is found), fallback count."""
    crops, fallbacks = [], 0
    for path in paths:
        image = read_image(path)
        face = choose_face(detector.detect([image])[0], image.shape)
        if face is None:
            fallbacks += 1
            crops.append(center_crop_fallback(image))
        else:
            crops.append(norm_crop(image, face.landmarks))
    return np.stack(crops), fallbacks


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Round robin over ``runs`` (one warm-up each), median wall time per run."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}


def available(precisions) -> list[str]:
    return [p for p in precisions if unsupported_reason(p) is None]


def embedder_rows(args, crops_by_protocol, calibration: Path) -> list[dict]:
    models = {
        "mobilefacenet": dict(name="mobilefacenet"),
        "faceplugin-512d": dict(name="onnx", weights=str(ASSETS / "weights/mobilefacenet/faceplugin_fr_feature_512d.onnx"), preset="faceplugin"),
    }
    rows = []
    for label, spec in models.items():
        embedders = {}
        for precision in available(PRECISIONS):
            extra = {"calibrate": str(calibration)} if precision == "int8" else {}
            embedders[precision] = create_embedder(**spec, precision=precision, threads=args.threads, batch_size=32, **extra)
        batch = crops_by_protocol["speed"][:32]
        seconds = median_seconds({p: (lambda e=e: e.embed(batch, flip=False)) for p, e in embedders.items()}, args.repeats)
        reference = {}
        for precision, embedder in embedders.items():
            row = {"model": label, "precision": precision, "speedup": seconds["fp32"] / seconds[precision],
                   "img_per_s": len(batch) / seconds[precision]}
            if not args.quick:
                for protocol in ("FF", "FP"):
                    pairs, crops = crops_by_protocol[protocol]
                    features = embedder.embed(crops, flip=True)
                    if precision == "fp32":
                        reference[protocol] = normalize_rows(features)
                    unit = normalize_rows(features)
                    cosine = np.sum(unit * reference[protocol], axis=1)
                    row[f"cos_min_{protocol}"], row[f"cos_mean_{protocol}"] = float(cosine.min()), float(cosine.mean())
                    left, right = pairs
                    result = evaluate_distances(pair_distances(unit[left], unit[right]), crops_by_protocol[protocol + "_same"])
                    row[f"CFP-{protocol}"] = 100 * result.accuracy
            else:
                features = normalize_rows(embedder.embed(crops_by_protocol["speed"], flip=False))
                reference.setdefault("speed", features)
                cosine = np.sum(features * reference["speed"], axis=1)
                row["cos_min_FF"], row["cos_mean_FF"] = float(cosine.min()), float(cosine.mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def iresnet100_rows(args, crops: np.ndarray, calibration: Path, workdir: Path) -> list[dict]:
    config = get_config("iresnet100")
    path = export_onnx(create_model("iresnet100").eval(), config, workdir / "iresnet100.onnx")
    embedders = {}
    for precision in available(PRECISIONS if args.iresnet_int8 else ("fp32", "bf16")):
        extra = {"calibrate": calibration} if precision == "int8" else {}
        embedders[precision] = OnnxEmbedder(path, threads=args.threads, batch_size=32, input_format=config.input_format,
                                            mean=config.mean, std=config.std, precision=precision, model_name="iresnet100", **extra)
    batch = crops[:16]
    seconds = median_seconds({p: (lambda e=e: e.embed(batch, flip=False)) for p, e in embedders.items()}, args.repeats)
    rows = [{"model": "iresnet100 (random weights)", "precision": p, "speedup": seconds["fp32"] / s, "img_per_s": len(batch) / s}
            for p, s in seconds.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def retinaface_rows(args) -> list[dict]:
    detectors = {p: create_detector("retinaface", precision=p, intra_op_threads=1, threshold=0.02)
                 for p in available(("fp32", "bf16"))}
    paths = list_images(ASSETS / "widerface" / "val_images")
    vga = cv2.resize(read_image(paths[0]), (640, 480))
    torch.set_num_threads(1)
    seconds = median_seconds({p: (lambda d=d: d.detect([vga])) for p, d in detectors.items()}, args.repeats * 3)
    torch.set_num_threads(args.threads)
    rows = []
    ground_truth = None if args.quick else wider.load_ground_truth(ASSETS / "widerface")
    for precision, detector in detectors.items():
        row = {"model": "retinaface-mnet", "precision": precision, "speedup": seconds["fp32"] / seconds[precision],
               "detect_ms_vga_1thread": 1000 * seconds[precision]}
        if ground_truth is not None:
            keys, predictions = [], {}
            for path in paths:
                key = wider.image_key(path)
                keys.append(key)
                predictions[key] = wider.faces_to_rows(detector.detect([read_image(path)])[0])
            result = wider.evaluate(predictions, ground_truth, images=keys)
            row.update({f"AP_{s}": float(result.ap[s]) for s in ("easy", "medium", "hard")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = ["model", "precision", "CFP-FF", "CFP-FP", "cos_min_FF", "cos_mean_FF", "cos_min_FP", "AP_easy", "AP_medium",
               "AP_hard", "speedup"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4f}" if isinstance(value, float) and column.startswith(("cos", "AP")) else
                         f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--splits", default="1", help="official CFP splits to evaluate, e.g. 1,2 (all: 1-10)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="speed and cosines only")
    parser.add_argument("--iresnet-int8", action="store_true", help="also calibrate and time int8 iresnet100")
    parser.add_argument("--embedders-only", action="store_true", help="skip iresnet100 speed and RetinaFace")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_summary()}; threads {args.threads}; precisions available here: {', '.join(available(PRECISIONS))}")

    detector = create_detector("retinaface")
    celebrities = list_images(ASSETS / "images" / "celebrities")
    calibration_crops, _ = aligned_crops(celebrities, detector)
    workdir = Path(tempfile.mkdtemp(prefix="facepipe-precision-"))
    calibration = workdir / "calibration"
    calibration.mkdir()
    for i, crop in enumerate(calibration_crops):
        cv2.imwrite(str(calibration / f"{i:03d}.png"), crop)

    splits = {int(s) for s in args.splits.replace("-", ",").split(",") if s}
    data: dict = {}
    cfp_root = ASSETS / "cfp" / "cfp-dataset"
    for protocol in ("FF", "FP"):
        pairs = read_cfp_pairs(cfp_root, protocol)
        keep = np.isin(pairs.fold, sorted(splits))
        left = [p for p, k in zip(pairs.left, keep) if k]
        right = [p for p, k in zip(pairs.right, keep) if k]
        paths = list(dict.fromkeys(left + right))
        index = {p: i for i, p in enumerate(paths)}
        if args.quick:
            paths = paths[:64]
        started = time.perf_counter()
        crops, fallbacks = aligned_crops(paths, detector)
        print(f"CFP-{protocol} splits {sorted(splits)}: {int(keep.sum())} pairs, {len(paths)} images aligned "
              f"({fallbacks} centre-crop fallbacks) in {time.perf_counter() - started:.0f} s", flush=True)
        data[protocol] = ((np.array([index[p] for p in left]), np.array([index[p] for p in right])), crops)
        data[protocol + "_same"] = pairs.issame[keep]
    data["speed"] = data["FF"][1][:64]

    rows = embedder_rows(args, data, calibration)
    if not args.embedders_only:
        rows += iresnet100_rows(args, data["speed"], calibration, workdir)
        rows += retinaface_rows(args)
    print(f"\nCPU: {cpu_summary()}; CFP splits {sorted(splits)} (10-fold over their pairs); speed = x onnxruntime fp32, same run")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "splits": sorted(splits), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
