"""Build a noisy face training set from CFP, with a record of every fault, to measure ``facepipe audit``.

Real faces, known faults: CFP frontal images of ``--identities`` people are aligned with ``facepipe align`` into
a training folder (identity = folder); then, with ``--seed``:

- **misfiled**: a fraction of the images is moved into another identity's folder;
- **split**: a fraction of the identities has half its images moved into a second folder ``<id>_alt``;
- **copies**: a fraction of the images gets a near-duplicate — downscaled (50–90 %), slightly cropped (0–6 %),
  re-encoded as JPEG (quality 60–90) — in the same folder or, for a third of them, another identity's;
- **evaluation set**: ``--overlap`` training identities give 4 of their frontal images to an evaluation folder
  (the training set keeps the other 6), beside as many identities that are not in the training set.

Both folders are embedded with ``facepipe embed``; ``truth.json`` lists every fault. Then run
``eval/audit_quality.py OUT`` for precision and recall per kind.

    python eval/make_noisy_training_set.py --cfp ../shared/assets/cfp/cfp-dataset --out /tmp/noisy --identities 200
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np


def facepipe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "facepipe", *args], check=True)


def degrade(crop: np.ndarray, rng: np.random.Generator) -> bytes:
    """A resized, slightly cropped, re-encoded copy of a 112×112 crop."""
    h, w = crop.shape[:2]
    cut = int(round(rng.uniform(0.0, 0.06) * w))
    part = crop[cut : h - cut, cut : w - cut]
    scale = rng.uniform(0.5, 0.9)
    small = cv2.resize(part, (max(8, int(w * scale)), max(8, int(h * scale))), interpolation=cv2.INTER_AREA)
    back = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, data = cv2.imencode(".jpg", back, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 91))])
    assert ok
    return data.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfp", required=True, type=Path, help="CFP data set folder")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--identities", type=int, default=200, help="training identities")
    parser.add_argument("--overlap", type=int, default=25, help="training identities also in the evaluation set")
    parser.add_argument("--misfiled", type=float, default=0.03)
    parser.add_argument("--split", type=float, default=0.05)
    parser.add_argument("--copies", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    images = args.cfp / "Data" / "Images"
    people = sorted(p.name for p in images.iterdir() if p.is_dir())
    needed = args.identities + args.overlap
    if len(people) < needed:
        raise SystemExit(f"CFP has {len(people)} identities, {needed} needed")
    chosen = [str(p) for p in rng.permutation(people)[:needed]]
    train_ids, outside_ids = chosen[: args.identities], chosen[args.identities :]
    overlap_ids = train_ids[: args.overlap]

    args.out.mkdir(parents=True, exist_ok=True)
    listing = args.out / "images.txt"
    listing.write_text("".join(f"{person}/frontal/{i:02d}.jpg\n" for person in chosen for i in range(1, 11)))
    facepipe("align", str(listing), "--root", str(images), "--out", str(args.out / "aligned_all"), "--format", "png", "--no-progress")

    train, evaluation = args.out / "train", args.out / "eval"
    for folder in (train, evaluation):
        shutil.rmtree(folder, ignore_errors=True)
    for person in chosen:
        crops = sorted((args.out / "aligned_all" / person / "frontal").glob("*.png"))
        to_eval = crops[:4] if person in overlap_ids else crops if person in outside_ids else []
        for crop in crops:
            target = (evaluation if crop in to_eval else train) / person
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(crop, target / crop.name)

    truth: dict[str, list] = {"misfiled": [], "split": [], "copies": [], "overlap": sorted(overlap_ids)}
    all_crops = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png"))
    for rel in rng.choice(all_crops, int(round(args.misfiled * len(all_crops))), replace=False):
        source_id = rel.split("/")[0]
        target_id = str(rng.choice([p for p in train_ids if p != source_id]))
        new_rel = f"{target_id}/misfiled_{source_id}_{Path(rel).name}"
        shutil.move(train / rel, train / new_rel)
        truth["misfiled"].append(new_rel)
    for person in rng.choice(train_ids, int(round(args.split * len(train_ids))), replace=False):
        crops = sorted(p for p in (train / person).glob("*.png") if not p.name.startswith("misfiled_"))
        (train / f"{person}_alt").mkdir()
        for crop in crops[1::2]:
            shutil.move(crop, train / f"{person}_alt" / crop.name)
        truth["split"].append([str(person), f"{person}_alt"])
    remaining = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png"))
    for k, rel in enumerate(rng.choice(remaining, int(round(args.copies * len(remaining))), replace=False)):
        crop = cv2.imread(str(train / rel))
        folder = Path(rel).parent.as_posix() if k % 3 else str(rng.choice([p for p in train_ids if p != rel.split("/")[0]]))
        copy_rel = f"{folder}/copy_{k:04d}.jpg"
        (train / copy_rel).write_bytes(degrade(crop, rng))
        truth["copies"].append([rel, copy_rel])
        if folder != Path(rel).parent.as_posix():
            truth["misfiled"].append(copy_rel)  # a copy filed under someone else is misfiled too
    (args.out / "truth.json").write_text(json.dumps(truth, indent=1))

    for name, folder in (("train", train), ("eval", evaluation)):
        facepipe("embed", str(folder), "--out", str(args.out / f"emb_{name}"), "--no-progress")
    print(f"training set {train} ({len(list(train.rglob('*.*')))} crops), evaluation set {evaluation}; truth {args.out / 'truth.json'}")


if __name__ == "__main__":
    main()
