"""Build a noisy face training set from CFP, with a record of every fault, to measure ``facepipe audit``.

Real faces, known faults: CFP frontal images of ``--identities`` people are aligned with ``facepipe align`` into
a training folder (identity = folder); then, with ``--seed``:

- **misfiled**: a fraction of the images is moved into another identity's folder;
- **split**: a fraction of the identities has half its images moved into a second folder ``<id>_alt``;
- **copies**: a fraction of the images gets a near-duplicate made the way scraped data gets them: the original
  photo downscaled (50–90 %), slightly cropped (0–6 % off each side), re-encoded as JPEG (quality 60–90), then
  detected and aligned like every other image — in the same folder or, for a third of them, another identity's;
- **evaluation set**: ``--overlap`` training identities give 4 of their frontal images to an evaluation folder
  (the training set keeps the other 6), beside as many identities that are not in the training set.

Both folders, and the training folder before any fault was injected (``emb_clean``: CFP's own faults, which
the audit finds too, are told apart from the injected ones with it), are embedded with ``facepipe embed``;
``truth.json`` lists every injected fault (and how each copy was made: ``copy_settings``). Then run ``eval/audit_quality.py OUT`` for precision and recall per kind.

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


def degrade(image: np.ndarray, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A downscaled, slightly cropped, re-encoded copy of a photo, and how it was made."""
    h, w = image.shape[:2]
    top, bottom, left, right = (int(round(rng.uniform(0.0, 0.06) * side)) for side in (h, h, w, w))
    part = image[top : h - bottom, left : w - right]
    scale = rng.uniform(0.5, 0.9)
    small = cv2.resize(part, (max(8, int(part.shape[1] * scale)), max(8, int(part.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    quality = int(rng.integers(60, 91))
    ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    made = {"crop_px": [top, bottom, left, right], "scale": round(float(scale), 4), "jpeg_quality": quality, "size": list(small.shape[1::-1])}
    return data.tobytes(), made


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

    facepipe("embed", str(train), "--out", str(args.out / "emb_clean"), "--no-progress")
    truth: dict[str, list | dict] = {"misfiled": [], "split": [], "copies": [], "overlap": sorted(overlap_ids), "copy_settings": {}}
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
    remaining = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png") if not p.name.startswith("misfiled_"))
    originals = args.out / "copy_originals"
    shutil.rmtree(originals, ignore_errors=True)
    planned = []
    for k, rel in enumerate(rng.choice(remaining, int(round(args.copies * len(remaining))), replace=False)):
        person = rel.split("/")[0].removesuffix("_alt")
        photo = cv2.imread(str(images / person / "frontal" / Path(rel).with_suffix(".jpg").name))
        folder = Path(rel).parent.as_posix() if k % 3 else str(rng.choice([p for p in train_ids if p != rel.split("/")[0]]))
        (originals / folder).mkdir(parents=True, exist_ok=True)
        data, made = degrade(photo, rng)
        (originals / folder / f"copy_{k:04d}.jpg").write_bytes(data)
        planned.append((rel, f"{folder}/copy_{k:04d}.png", made))
    facepipe("align", str(originals), "--out", str(args.out / "copies_aligned"), "--format", "png", "--no-progress")
    for rel, copy_rel, made in planned:
        aligned = args.out / "copies_aligned" / copy_rel
        if not aligned.is_file():
            continue  # no face found in the degraded copy
        shutil.copy(aligned, train / copy_rel)
        truth["copies"].append([rel, copy_rel])
        truth["copy_settings"][copy_rel] = made  # crop (top, bottom, left, right px), scale, JPEG quality, size
        if Path(copy_rel).parent != Path(rel).parent:
            truth["misfiled"].append(copy_rel)  # a copy filed under someone else is misfiled too
    (args.out / "truth.json").write_text(json.dumps(truth, indent=1))

    for name, folder in (("train", train), ("eval", evaluation)):
        facepipe("embed", str(folder), "--out", str(args.out / f"emb_{name}"), "--no-progress")
    print(f"training set {train} ({len(list(train.rglob('*.*')))} crops), evaluation set {evaluation}; truth {args.out / 'truth.json'}")


if __name__ == "__main__":
    main()
