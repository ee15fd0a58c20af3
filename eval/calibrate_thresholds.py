"""Measure a model's "same person" cosine thresholds on CFP and store them for ``facepipe index search``.

Every image of the CFP-FF and CFP-FP protocol pairs goes through the pipeline of ``facepipe eval cfp``
(``facepipe.evaluation.raw_pipeline``: RetinaFace on the image with a 0.25 black border, the main face, ArcFace
alignment, embedding plus its mirror's), and is scored like a gallery search: cosine of the L2-normalised
flip-summed embeddings (what ``facepipe embed`` stores by default).

* Threshold at FAR f: the score above which a fraction f of *different-person* pairs falls. The official pair
  lists hold only 7,000 different-person pairs (FAR 1e-4 would rest on 0.7 of a pair), so the thresholds are
  taken over all different-identity pairs of the same images (~24 M, profile-profile pairs included); the
  official pairs' own FAR 1e-3 threshold (lower: frontal-frontal and frontal-profile pairs only) is stored
  beside them as a check.
* TAR: the fraction of the official same-person pairs (FF + FP) above each threshold.

The result is merged into ``facepipe/index/thresholds.json`` under the model's key (name for bundled weights,
SHA-256 of the weights file otherwise) with the command, date and CPU. Features are cached like ``eval cfp``'s
(``--cache-dir``), so a run after ``facepipe eval cfp`` with the same cache only scores.

    python eval/calibrate_thresholds.py --root ../shared/assets/cfp/cfp-dataset
    python eval/calibrate_thresholds.py --root ... --model onnx --weights faceplugin_fr_feature_512d.onnx
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from facepipe.detection.base import create_detector
from facepipe.embedding import create_embedder
from facepipe.evaluation.protocols import read_cfp_pairs
from facepipe.evaluation.raw_pipeline import PipelineSpec, extract_features
from facepipe.index.thresholds import THRESHOLDS_FILE, all_impostor_scores, threshold_at_far, weights_key
from facepipe.io.atomic import atomic_write_text
from facepipe.io.images import read_image
from facepipe.models.checkpoint import cache_dir
from facepipe.runtime.cpu import cpu_summary

FARS = (1e-3, 1e-4)
PAD = 0.25  # eval cfp's default border
MIN_SCORE = 0.5



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="CFP data set folder (holds Protocol/ and Data/).")
    parser.add_argument("--model", default="mobilefacenet")
    parser.add_argument("--weights", default=None, help="Embedding weights (default: bundled).")
    parser.add_argument("--detector", default="retinaface")
    parser.add_argument("--splits", default=None, help="Comma-separated CFP splits (default: all 10).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=cache_dir() / "verification")
    parser.add_argument("--out", type=Path, default=THRESHOLDS_FILE, help="Thresholds file to merge into.")
    args = parser.parse_args()

    splits = [int(s) for s in args.splits.split(",")] if args.splits else None
    pairs = {p: read_cfp_pairs(args.root, p).subset(splits, None) for p in ("FF", "FP")}
    keys = list(dict.fromkeys(os.path.abspath(path) for pl in pairs.values() for path in pl.unique_paths()))
    spec = PipelineSpec(args.detector, None, args.model, args.weights, min_score=MIN_SCORE, mode="raw", pad=PAD)
    detector = create_detector(args.detector)
    embedder = create_embedder(args.model, weights=args.weights, batch_size=args.batch_size)
    features = extract_features(keys, read_image, detector, embedder, spec, cache_dir=args.cache_dir,
                                batch_size=args.batch_size, description=f"CFP {args.model}")
    summed = features.embedding + features.embedding_flip
    embeddings = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    position = features.index()
    identities = np.array([Path(key).parts[-3] for key in features.keys])  # .../Images/<id>/<pose>/NN.jpg

    left = np.concatenate([[position[os.path.abspath(p)] for p in pl.left] for pl in pairs.values()]).astype(int)
    right = np.concatenate([[position[os.path.abspath(p)] for p in pl.right] for pl in pairs.values()]).astype(int)
    issame = np.concatenate([pl.issame for pl in pairs.values()])
    pair_scores = np.einsum("ij,ij->i", embeddings[left], embeddings[right])
    impostors = all_impostor_scores(embeddings, identities)

    thresholds = {f"{far:.0e}": round(threshold_at_far(impostors, far), 4) for far in FARS}
    tar = {far: round(float(np.mean(pair_scores[issame] > t)), 4) for far, t in thresholds.items()}
    entry = {
        "model": args.model,
        "weights": "bundled" if args.weights is None else Path(args.weights).name,
        "thresholds": thresholds,
        "tar": tar,
        "provenance": {
            "data": f"CFP FF+FP, splits {args.splits or '1-10'}",
            "images": len(keys),
            "no_face_fallbacks": features.n_fallback,
            "impostor_pairs": int(len(impostors)),
            "genuine_pairs": int(issame.sum()),
            "official_pairs_threshold_far_1e-03": round(threshold_at_far(pair_scores[~issame], 1e-3), 4),
            "official_impostor_pairs": int((~issame).sum()),
            "pipeline": f"{args.detector}, pad {PAD}, min score {MIN_SCORE}, ArcFace 112 alignment, flip-sum, L2",
            "command": " ".join(["python", "eval/calibrate_thresholds.py", *map(shlex.quote, sys.argv[1:])]),
            "date": datetime.date.today().isoformat(),
            "cpu": cpu_summary(),
        },
    }
    table = json.loads(args.out.read_text()) if args.out.is_file() else {}
    table.setdefault("models", {})[weights_key(args.model, args.weights)] = entry
    atomic_write_text(args.out, json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(json.dumps(entry, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
