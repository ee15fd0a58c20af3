"""Accuracy and speed of reduced precision (bf16 on OpenVINO, calibrated int8 on onnxruntime) against fp32.

Per model and precision, in one process on this CPU (its model and flags are printed first). Parts
(``--parts``, default all):

* ``embedders`` (bundled MobileFaceNet, the shared faceplugin 512-d ONNX): CFP-FF / CFP-FP accuracy, 10-fold
  over the pairs of the chosen official splits (``--splits``; all ten = the full protocol), on crops detected by
  fp32 RetinaFace and aligned once; the cosine between the fp32 and reduced-precision embeddings of those crops
  (min / mean); and images/s against onnxruntime fp32 (batch 32, no flip, ``--threads``), round robin, median;
* ``ijbc``: the same embedders on a mini IJB-C built from CFP (``facepipe.evaluation.ijbc_mini``, ``--ijbc-subjects``
  identities, five points from fp32 RetinaFace), features as ``facepipe eval ijbc`` extracts them
  (``extract_batch``: aligned from the given points or re-detected by each of ``--ijbc-detectors``, fp32
  detectors, [orig, flip]), pooled and scored as it does (N1D1F1): TAR at FAR 1e-3 and 1e-2;
* ``iresnet100`` (random weights: no released weights are here; speed does not depend on them): speed only;
* ``retinaface`` (RetinaFace-mnet) and ``scrfd`` (the shared SCRFD-2.5G-kps, 640x640 letterbox): WIDER AP
  (easy / medium / hard) on the shared val images (RetinaFace at original size; score >= 0.02, written as
  ``eval widerface`` writes them), and full ``detect()`` time on a 640x480 image with 1 thread: as ``detect``
  runs it (threshold 0.5; "speed") and returning every row down to 0.02 ("speed, rows >= 0.02").

int8 is calibrated on crops of ``images/celebrities`` (detected and aligned here), people who are not in CFP.
Goals (issue 14): verification within 0.2 pt, AP within 0.003, speed >= 2x for iresnet100 and MobileFaceNet
embedding, >= 1.5x for RetinaFace detect() at VGA with 1 thread.

    FACEPIPE_HOME=/tmp/fp .venv/bin/python eval/precision_report.py --splits 1,2 --json report.json
    .venv/bin/python eval/precision_report.py --parts retinaface,scrfd --quick   # detector speed only
    .venv/bin/python eval/precision_report.py --quick     # speed and cosines only, no CFP/WIDER/IJB-C accuracy
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
from facepipe.embedding.base import create_embedder, l2_normalize
from facepipe.embedding.onnx_embedder import OnnxEmbedder, export_onnx
from facepipe.evaluation import widerface as wider
from facepipe.evaluation.protocols import read_cfp_pairs
from facepipe.evaluation.raw_pipeline import center_crop_fallback, choose_face
from facepipe.evaluation.verification import evaluate_distances, pair_distances
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


def embedder_specs() -> dict[str, dict]:
    return {
        "mobilefacenet": dict(name="mobilefacenet"),
        "faceplugin-512d": dict(name="onnx", weights=str(ASSETS / "weights/mobilefacenet/faceplugin_fr_feature_512d.onnx"), preset="faceplugin"),
    }


def embedder_rows(args, crops_by_protocol, calibration: Path) -> list[dict]:
    rows = []
    for label, spec in embedder_specs().items():
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
                        reference[protocol] = l2_normalize(features)
                    unit = l2_normalize(features)
                    cosine = np.sum(unit * reference[protocol], axis=1)
                    row[f"cos_min_{protocol}"], row[f"cos_mean_{protocol}"] = float(cosine.min()), float(cosine.mean())
                    left, right = pairs
                    result = evaluate_distances(pair_distances(unit[left], unit[right]), crops_by_protocol[protocol + "_same"])
                    row[f"CFP-{protocol}"] = 100 * result.accuracy
            else:
                features = l2_normalize(embedder.embed(crops_by_protocol["speed"], flip=False))
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


SCRFD_WEIGHTS = ASSETS / "weights" / "scrfd" / "scrfd_2.5g_bnkps.onnx"
VGA = (640, 480)


def scrfd_at(precision: str, threads: int):
    """SCRFD-2.5G at ``precision``: fp32 is onnxruntime (insightface's numbers), bf16 OpenVINO on the same graph."""
    return create_detector("scrfd", weights=str(SCRFD_WEIGHTS), intra_op_threads=threads, precision=precision)


def detector_rows(args, name: str) -> list[dict]:
    """WIDER AP (rows >= 0.02) and 1-thread ``detect()`` time at VGA: at the detector's own threshold (0.5, what
    ``facepipe detect`` returns) and returning every row down to 0.02 (what WIDER evaluation asks for)."""
    if name == "scrfd":
        detectors = {p: scrfd_at(p, 1) for p in available(("fp32", "bf16"))}
    else:
        detectors = {p: create_detector(name, precision=p, intra_op_threads=1) for p in available(("fp32", "bf16"))}
    paths = list_images(ASSETS / "widerface" / "val_images")
    vga = cv2.resize(read_image(paths[0]), VGA)
    torch.set_num_threads(1)
    runs = {}
    for p, d in detectors.items():
        every_row = d.with_settings(threshold=0.02)
        runs[p] = lambda d=d: d.detect([vga])
        runs[p + " rows"] = lambda d=every_row: d.detect([vga])
    seconds = median_seconds(runs, args.repeats * 3)
    torch.set_num_threads(args.threads)
    label = "retinaface-mnet" if name == "retinaface" else "scrfd-2.5g"
    rows = []
    ground_truth = None if args.quick else wider.load_ground_truth(ASSETS / "widerface")
    for precision, detector in detectors.items():
        row = {"model": label, "precision": precision, "speedup": seconds["fp32"] / seconds[precision],
               "speedup_all_rows": seconds["fp32 rows"] / seconds[precision + " rows"],
               "detect_ms_vga_1thread": 1000 * seconds[precision],
               "detect_ms_vga_1thread_all_rows": 1000 * seconds[precision + " rows"]}
        if ground_truth is not None:
            every_row = detector.with_settings(threshold=0.02)
            keys, predictions = [], {}
            for path in paths:
                key = wider.image_key(path)
                keys.append(key)
                faces = every_row.detect([read_image(path)])[0]
                predictions[key] = wider.faces_to_rows(faces, plus_one=detector.name in wider.PLUS_ONE_WRITERS)
            result = wider.evaluate(predictions, ground_truth, images=keys)
            row.update({f"AP_{s}": float(result.ap[s]) for s in ("easy", "medium", "hard")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


IJBC_FARS = ("0.001", "0.01")


def ijbc_rows(args, calibration: Path, workdir: Path) -> list[dict]:
    """Mini IJB-C 1:1 TARs (N1D1F1) per embedder, precision and detector, computed as ``facepipe eval ijbc`` does."""
    from facepipe.evaluation.ijbc import ScoreConfig, TemplatePooling, evaluate_scores, pool_templates, score_pairs
    from facepipe.evaluation.ijbc_features import FLAG_DETECTOR_FALLBACK, extract_batch
    from facepipe.evaluation.ijbc_layout import read_ijb_layout
    from facepipe.evaluation.ijbc_mini import build_mini_ijbc

    root = workdir / "mini_ijbc"
    stats = build_mini_ijbc(ASSETS / "cfp" / "cfp-dataset", root, create_detector("retinaface"),
                            num_subjects=args.ijbc_subjects, progress=False)
    layout = read_ijb_layout(root, "IJBC")
    print(f"mini IJB-C: {stats.subjects} subjects, {stats.images} images, {stats.templates} templates, {stats.pairs} pairs "
          f"({stats.genuine_pairs} genuine)", flush=True)
    pooling = TemplatePooling.build(layout.templates, layout.medias)
    rows1, rows2 = pooling.template_rows(layout.pair_t1), pooling.template_rows(layout.pair_t2)
    config = ScoreConfig()  # N1D1F1
    detectors = {"given": None}
    for name in args.ijbc_detectors.split(","):
        if name != "given":
            detectors[name] = create_detector(name, weights=str(SCRFD_WEIGHTS) if name == "scrfd" else None)
    rows = []
    for label, spec in embedder_specs().items():
        for precision in available(PRECISIONS):
            extra = {"calibrate": str(calibration)} if precision == "int8" else {}
            embedder = create_embedder(**spec, precision=precision, threads=args.threads, batch_size=64, **extra)
            row = {"model": label, "precision": precision}
            for detector_name, detector in detectors.items():
                started = time.perf_counter()
                parts = []
                for start in range(0, layout.num_images, 64):
                    stop = min(start + 64, layout.num_images)
                    parts.append(extract_batch(layout.image_paths(start, stop), layout.landmarks[start:stop],
                                               layout.faceness[start:stop], embedder, detector))
                features = np.concatenate([part["features"] for part in parts])
                scores = np.concatenate([part["score"] for part in parts])
                fallbacks = int(sum((part["flag"] == FLAG_DETECTOR_FALLBACK).sum() for part in parts))
                templates = pool_templates(pooling, [(0, features, scores)], [config])[config]
                tars, _, _ = evaluate_scores(layout.labels, score_pairs(templates, rows1, rows2))
                for far in IJBC_FARS:
                    row[f"IJBC_{detector_name}_{far}"] = 100 * tars[far]
                row[f"IJBC_{detector_name}_fallbacks"] = fallbacks
                print(f"  {label} {precision} {detector_name}: {time.perf_counter() - started:.0f} s", flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def cell(column: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if column.startswith(("cos", "AP")) else f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """One table: the columns that some row has, in this order (IJB-C columns per detector as they came)."""
    order = ["model", "precision", "CFP-FF", "CFP-FP", "cos_min_FF", "cos_mean_FF", "cos_min_FP", "AP_easy", "AP_medium",
             "AP_hard", "speedup", "speedup_all_rows"]
    ijbc = [c for c in dict.fromkeys(k for row in rows for k in row) if c.startswith("IJBC_") and not c.endswith("fallbacks")]
    columns = [c for c in order[:-2] + ijbc + order[-2:] if any(c in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def merged(rows: list[dict]) -> list[dict]:
    """One row per (model, precision): the IJB-C TARs join the embedder's CFP row."""
    by_key: dict[tuple[str, str], dict] = {}
    for row in rows:
        by_key.setdefault((row["model"], row["precision"]), {}).update(row)
    return list(by_key.values())


PARTS = ("embedders", "ijbc", "iresnet100", "retinaface", "scrfd")


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise SystemExit(f"--parts takes a comma list of {', '.join(PARTS)}; got {text!r}")
    return parts


def cfp_crops(args, detector) -> dict:
    """Pairs, same-labels and aligned crops of the chosen CFP splits (and 64 FF crops for speed runs)."""
    splits = {int(s) for s in args.splits.replace("-", ",").split(",") if s}
    data: dict = {"splits": sorted(splits)}
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
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--splits", default="1", help="official CFP splits to evaluate, e.g. 1,2 (all: 1-10)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="speed and cosines only (no CFP, WIDER or IJB-C accuracy)")
    parser.add_argument("--iresnet-int8", action="store_true", help="also calibrate and time int8 iresnet100")
    parser.add_argument("--embedders-only", action="store_true", help="same as --parts embedders")
    parser.add_argument("--ijbc-subjects", type=int, default=30, help="CFP identities in the mini IJB-C (of 500)")
    parser.add_argument("--ijbc-detectors", default="given,retinaface,scrfd",
                        help="how IJB-C crops are aligned: given points and/or detectors re-detecting each loose crop "
                             "(also mtcnn: slow here)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    parts = ["embedders"] if args.embedders_only else parse_parts(args.parts)
    if args.quick and "ijbc" in parts:
        parts.remove("ijbc")  # TARs are accuracy
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_summary()}; threads {args.threads}; precisions available here: {', '.join(available(PRECISIONS))}; "
          f"parts: {', '.join(parts)}")

    detector = create_detector("retinaface")
    workdir = Path(tempfile.mkdtemp(prefix="facepipe-precision-"))
    calibration = workdir / "calibration"
    if {"embedders", "ijbc", "iresnet100"} & set(parts):
        calibration_crops, _ = aligned_crops(list_images(ASSETS / "images" / "celebrities"), detector)
        calibration.mkdir()
        for i, crop in enumerate(calibration_crops):
            cv2.imwrite(str(calibration / f"{i:03d}.png"), crop)
    data = cfp_crops(args, detector) if {"embedders", "iresnet100"} & set(parts) else {"splits": []}

    rows: list[dict] = []
    for part in parts:
        if part == "embedders":
            rows += embedder_rows(args, data, calibration)
        elif part == "ijbc":
            rows += ijbc_rows(args, calibration, workdir)
        elif part == "iresnet100":
            rows += iresnet100_rows(args, data["speed"], calibration, workdir)
        else:
            rows += detector_rows(args, part)
    print(f"\nCPU: {cpu_summary()}; CFP splits {data['splits']} (10-fold over their pairs); speed = x onnxruntime fp32, same run")
    rows = merged(rows)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "splits": data["splits"], "parts": parts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
