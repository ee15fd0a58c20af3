#!/usr/bin/env bash
# RetinaFace training recipes on the shared WIDER FACE val subset (boxes from wider_face_val.mat, no landmarks).
#
#   pipelines/finetune_retinaface_wider.sh finetune   # (a) fine-tune the official MobileNet-0.25 on 2/3 of the
#                                                     #     images; AP on the held-out 1/3, before vs after
#   pipelines/finetune_retinaface_wider.sh overfit    # (b) from scratch on a few images; AP on those images,
#                                                     #     random init vs trained (a sanity check, not a model)
#
# Settings via environment: SHARED (default ../shared/assets), OUT (runs/<mode>), EPOCHS, IMAGE_SIZE, BATCH,
# LR, WARMUP, DEVICE (cpu/cuda), THREADS, NUM_IMAGES (overfit), MAX_ITERS (cap per epoch), WORKERS.
# The WIDER .mat files are val ground truth: the fine-tuning run trains on val images, so its held-out AP is
# a smoke test of the training code, not a WIDER benchmark figure.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-finetune}
SHARED=${SHARED:-../shared/assets}
PY=${PY:-.venv/bin/python}
FACEPIPE=${FACEPIPE:-.venv/bin/facepipe}
OUT=${OUT:-runs/$MODE}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-2}
WORKERS=${WORKERS:-0}
MAX_ITERS=${MAX_ITERS:-}

case "$MODE" in
  finetune)
    EPOCHS=${EPOCHS:-3}; IMAGE_SIZE=${IMAGE_SIZE:-640}; BATCH=${BATCH:-8}; LR=${LR:-1e-4}; WARMUP=${WARMUP:-0}
    INIT=(--weights "$SHARED/weights/retinaface/mobilenet0.25_Final.pth") ;;
  overfit)
    # 320 px: random crops of 0.3-1.0 of the short side then show faces at 0.5-1.6x their original size,
    # around the original-size scale the evaluation runs at.
    EPOCHS=${EPOCHS:-150}; IMAGE_SIZE=${IMAGE_SIZE:-320}; BATCH=${BATCH:-8}; LR=${LR:-1e-2}; WARMUP=${WARMUP:-5}
    INIT=() ;;
  *) echo "usage: $0 finetune|overfit" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
# Split the shared images: train.jsonl (training images) and eval/<event>/<name>.jpg links (images scored).
"$PY" - "$MODE" "$SHARED" "$OUT" "${NUM_IMAGES:-16}" <<'PYEOF'
import sys
from pathlib import Path

from facepipe.train.data import read_annotations, write_jsonl

mode, shared, out, num_images = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
root = (shared / "widerface" / "val_images").resolve()
samples = read_annotations("wider-mat", shared / "widerface" / "wider_face_val.mat", root)
if mode == "finetune":
    train = [s for i, s in enumerate(samples) if i % 3 != 2]
    scored = [s for i, s in enumerate(samples) if i % 3 == 2]
else:  # a few images with a handful of faces that are not tiny, so that easy/medium AP can move
    def fits(s):
        sizes = s.faces.boxes[:, 2:] - s.faces.boxes[:, :2]
        return 1 <= len(s.faces) <= 10 and sizes.min() >= 20
    train = scored = [s for s in samples if fits(s)][:num_images]
write_jsonl(train, out / "train.jsonl", root)
for s in scored:
    link = out / "eval" / s.image_path.relative_to(root)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(s.image_path)
print(f"{mode}: {len(train)} training images ({sum(len(s.faces) for s in train)} faces), {len(scored)} scored")
PYEOF

EXTRA=()
[ -n "$MAX_ITERS" ] && EXTRA+=(--max-iters-per-epoch "$MAX_ITERS")
RESUME=()
[ -f "$OUT/train/resume.pt" ] && RESUME=(--resume)
"$FACEPIPE" train retinaface --data "$OUT/train.jsonl" --format jsonl --images "$SHARED/widerface/val_images" \
  --backbone mobilenet0.25 "${INIT[@]}" --out "$OUT/train" --epochs "$EPOCHS" --image-size "$IMAGE_SIZE" \
  --batch-size "$BATCH" --lr "$LR" --warmup-epochs "$WARMUP" --device "$DEVICE" --threads "$THREADS" \
  --workers "$WORKERS" --checkpoint-every 1000 "${RESUME[@]}" "${EXTRA[@]}" | tee "$OUT/train_summary.json"

for NAME in epoch_000 final; do
  WEIGHTS="$OUT/train/weights/$NAME.pth"
  [ "$NAME" = final ] && WEIGHTS="$OUT/train/final.pth"
  "$FACEPIPE" eval widerface --images "$OUT/eval" --gt "$SHARED/widerface" --detector retinaface \
    --detector-weights "$WEIGHTS" --out "$OUT/ap_$NAME.json" --device "$DEVICE" --threads "$THREADS"
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
before, after = (json.loads((out / f"ap_{n}.json").read_text()) for n in ("epoch_000", "final"))
summary = json.loads((out / "train_summary.json").read_text().strip().splitlines()[-1])
print(f"{'setting':<8}{'start':>9}{'trained':>9}")
for s in ("easy", "medium", "hard"):
    print(f"{s:<8}{before[s] or 0:>9.4f}{after[s] or 0:>9.4f}")
print(f"seconds per iteration: {summary['seconds_per_iter']}")
PYEOF
