"""Build an insightface-style verification .bin (like ``cfp_fp.bin`` / ``cfp_ff.bin``) from the raw CFP images.

Each image is detected (with the same black border, ``--pad``), its main face chosen and aligned to 112x112
exactly as ``facepipe eval cfp`` does (``facepipe.evaluation.raw_pipeline.align_batch``; no face ->
insightface's centre-crop fallback, counted).
Pairs are written in the order of ``facepipe.evaluation.protocols.read_cfp_pairs``: split by split, so the
ordered 10-fold split of ``facepipe eval verify`` coincides with the 10 official CFP splits.

    python eval/make_cfp_bin.py --root ../shared/assets/cfp/cfp-dataset --protocol FP --out cfp_fp.bin \\
        [--detector retinaface] [--splits 1,2] [--limit 50] [--format .png]

``.jpg`` (quality 95) matches the released files; ``.png`` is lossless, so ``facepipe eval verify`` on it
reproduces ``facepipe eval cfp`` exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from facepipe.detection.base import DETECTOR_NAMES, Detector, create_detector
from facepipe.evaluation.protocols import PairList, read_cfp_pairs
from facepipe.evaluation.raw_pipeline import STATUS_FALLBACK, align_batch
from facepipe.io.images import read_image
from facepipe.io.verification_bin import write_bin


def align_paths(
    paths: Sequence[Path], detector: Detector, batch_size: int = 32, min_score: float = 0.5, size: int = 112,
    pad: float = 0.25,
) -> tuple[np.ndarray, list[Path]]:
    """Aligned crops of ``paths`` (one per image) and the images that needed the fallback crop."""
    crops = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    fallback: list[Path] = []
    with tqdm(total=len(paths), desc="align", unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            batch = list(paths[start : start + batch_size])
            batch_crops, status, _ = align_batch([read_image(p) for p in batch], detector, min_score, size, pad=pad)
            crops[start : start + len(batch)] = batch_crops
            fallback.extend(p for p, s in zip(batch, status) if s == STATUS_FALLBACK)
            bar.update(len(batch))
    return crops, fallback


def build_bin_from_pairs(
    pairs: PairList, detector: Detector, out: str | os.PathLike, batch_size: int = 32, min_score: float = 0.5,
    ext: str = ".jpg", pad: float = 0.25,
) -> dict[str, Any]:
    """Align every image of ``pairs`` once and write the .bin (pair ``i`` = images ``2i``, ``2i+1``)."""
    unique = pairs.unique_paths()
    crops, fallback = align_paths(unique, detector, batch_size, min_score, pad=pad)
    row = {path: i for i, path in enumerate(unique)}
    images = [crops[row[p]] for pair in zip(pairs.left, pairs.right) for p in pair]
    write_bin(images, pairs.issame, out, ext=ext)
    return {
        "out": str(out),
        "pairs": len(pairs),
        "same": int(pairs.issame.sum()),
        "images": len(unique),
        "fallback": len(fallback),
        "fallback_paths": [str(p) for p in fallback],
        "folds": pairs.folds,
    }


def build_cfp_bin(
    root: str | os.PathLike, protocol: str, out: str | os.PathLike, detector: Detector,
    splits: Sequence[int] | None = None, limit: int | None = None, batch_size: int = 32, min_score: float = 0.5,
    ext: str = ".jpg", pad: float = 0.25,
) -> dict[str, Any]:
    """``cfp_ff.bin`` / ``cfp_fp.bin`` from the CFP data set folder (optionally a subset of splits / pairs)."""
    pairs = read_cfp_pairs(root, protocol).subset(splits, limit)
    summary = build_bin_from_pairs(pairs, detector, out, batch_size, min_score, ext, pad)
    return {"protocol": protocol, **summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="CFP data set folder (holds Protocol/ and Data/)")
    parser.add_argument("--protocol", choices=["FF", "FP"], default="FP")
    parser.add_argument("--out", required=True)
    parser.add_argument("--detector", choices=DETECTOR_NAMES, default="retinaface")
    parser.add_argument("--detector-weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--splits", default=None, help="comma-separated split numbers (default all 10)")
    parser.add_argument("--limit", type=int, default=None, help="pairs per split (default all 700)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-score", type=float, default=0.5)
    parser.add_argument("--pad", type=float, default=0.25, help="border before detection (as facepipe eval cfp)")
    parser.add_argument("--format", choices=[".jpg", ".png"], default=".jpg")
    args = parser.parse_args(argv)
    splits = [int(s) for s in args.splits.split(",")] if args.splits else None
    detector = create_detector(args.detector, weights=args.detector_weights, device=args.device)
    summary = build_cfp_bin(args.root, args.protocol, args.out, detector, splits, args.limit, args.batch_size,
                            args.min_score, args.format, args.pad)
    shown = {k: v for k, v in summary.items() if k != "fallback_paths"}
    print(json.dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
