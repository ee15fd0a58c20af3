"""MTCNN CPU speed: our batched cascade against a straightforward one-image path, in the same process.

Configurations, all on a real photo (``images/group/t1.jpg``, 1280x886, 8 faces) and all producing the same
faces (the script prints the largest difference to the first configuration):

* ``facepipe, 1 image/call``: ``create_mtcnn().detect([image])``.
* ``facepipe, N images/call``: the same image N times in one call (one P-Net pass per pyramid level for all
  of them, R-Net / O-Net on the crops of all of them).
* ``straightforward``: the facenet-pytorch structure re-run with the same networks and NMS - torch
  ``interpolate(mode="area")`` per pyramid level and one ``interpolate`` call per R-Net / O-Net crop, one image
  at a time. This is the path the integral image and the batching replace.
* ``N/call, unpacked`` (``--cfp`` mode): the batched row with every pyramid level in a P-Net pass of its own
  (``PACK_BELOW_PIXELS`` 0), what the packing of small levels saves.
* ``facenet-pytorch``: the reference package itself, when it is importable (it needs torchvision; on a CPU-only
  torch, ``bash eval/facenet_pytorch_cpu.sh DIR`` installs it and prints the two variables to set).

Each figure is the median of ``--runs`` timed calls after ``--warmup`` untimed ones, in ms per image; the
configurations take turns, so a change of load hits all of them alike.

    .venv/bin/python eval/bench_mtcnn.py --runs 5 --threads 1
    .venv/bin/python eval/bench_mtcnn.py --cfp 40 --runs 3      # padded CFP: the compare-detectors workload
    .venv/bin/python eval/bench_mtcnn.py --cfp 64 --runs 3 --threads 2   # ... with both cores: the issue-17 goal

In ``--cfp`` mode every row takes ``--threads`` cores: the reference as torch intra-op threads (what
facenet-pytorch gets by default), facepipe's batched row as that many images at once (``MTCNNDetector.workers``).

Figures are only comparable within one run; on a shared, loaded machine they are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import facepipe.detection.mtcnn as mtcnn_module
from facepipe.detection.mtcnn import (
    MTCNNDetector,
    apply_regression,
    batched_nms,
    create_mtcnn,
    crop_windows,
    nms_min,
    pyramid_scales,
    square,
)
from facepipe.models.mtcnn import normalize_rgb
from facepipe.runtime.cpu import cpu_summary

ASSETS = Path(os.environ.get("FACEPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets"
Result = tuple[np.ndarray, np.ndarray, np.ndarray]


def straightforward_detect(det: MTCNNDetector, bgr: np.ndarray) -> Result:
    """One image, torch resampling per level and per crop (the reference's structure); boxes by area."""
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1]))[None].permute(0, 3, 1, 2).float()
    height, width = bgr.shape[:2]
    zeros = lambda n: np.zeros(n, np.int64)  # noqa: E731
    levels = []
    for scale in pyramid_scales(height, width, det.min_face_size, det.factor):
        pixels = F.interpolate(rgb, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
        offsets, probs = (t[0].numpy() for t in det.pnet(normalize_rgb(pixels)))
        ys, xs = np.nonzero(probs >= np.float32(det.thresholds[0]))
        cells = np.stack([xs, ys], axis=1).astype(np.float32)
        rows = np.concatenate([
            np.floor((2 * cells + 1) / np.float32(scale)),
            np.floor((2 * cells + 12) / np.float32(scale)),
            probs[ys, xs][:, None],
            offsets[:, ys, xs].T,
        ], axis=1)
        levels.append(rows[batched_nms(rows[:, :4], rows[:, 4], zeros(len(rows)), 0.5)])
    rows = np.concatenate(levels)
    rows = rows[batched_nms(rows[:, :4], rows[:, 4], zeros(len(rows)), 0.7)]
    boxes, scores = square(apply_regression(rows[:, :4], rows[:, 5:9], plus_one=False)), rows[:, 4]

    def crops(boxes: np.ndarray, size: int) -> tuple[np.ndarray, torch.Tensor]:
        top, bottom, left, right, valid = crop_windows(boxes, width, height)
        patches = [
            F.interpolate(rgb[:, :, top[k]:bottom[k], left[k]:right[k]], size=(size, size), mode="area")
            for k in np.flatnonzero(valid)
        ]
        return valid, normalize_rgb(torch.cat(patches))

    valid, inputs = crops(boxes, 24)
    offsets, probs = (t.numpy() for t in det.rnet(inputs))
    passed = probs > np.float32(det.thresholds[1])
    boxes, scores, offsets = boxes[valid][passed], probs[passed], offsets[passed]
    keep = batched_nms(boxes, scores, zeros(len(boxes)), 0.7)
    boxes, scores = square(apply_regression(boxes[keep], offsets[keep], plus_one=True)), scores[keep]

    valid, inputs = crops(boxes, 48)
    offsets, fractions, probs = (t.numpy() for t in det.onet(inputs))
    passed = probs > np.float32(det.thresholds[2])
    boxes, scores, offsets, fractions = boxes[valid][passed], probs[passed], offsets[passed], fractions[passed]
    w, h = boxes[:, 2:3] - boxes[:, 0:1] + 1, boxes[:, 3:4] - boxes[:, 1:2] + 1
    points = np.stack([w * fractions[:, :5] + boxes[:, 0:1] - 1, h * fractions[:, 5:] + boxes[:, 1:2] - 1], axis=2)
    boxes = apply_regression(boxes, offsets, plus_one=True)
    keep = nms_min(boxes, scores, 0.7)
    boxes, scores, points = boxes[keep], scores[keep], points[keep]
    order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]
    return boxes[order], scores[order], points[order]


def facenet_pytorch_detect() -> Callable[[np.ndarray], Result] | None:
    try:
        from facenet_pytorch import MTCNN  # type: ignore[import-not-found]
    except Exception:  # not installed, or torchvision missing
        return None
    mtcnn = MTCNN(keep_all=True)

    def run(bgr: np.ndarray) -> Result:
        boxes, probs, points = mtcnn.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), landmarks=True)
        return np.asarray(boxes, np.float32), np.asarray(probs, np.float32), np.asarray(points, np.float32)

    return run


def time_round_robin(configs: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each configuration, timed in turns so that load changes hit them all alike."""
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(runs):
        for name, fn in configs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def max_difference(a: Result, b: Result) -> str:
    if a[0].shape != b[0].shape:
        return f"different faces ({len(a[0])} vs {len(b[0])})"
    return f"max |diff| box {np.abs(a[0] - b[0]).max(initial=0):.1e} px, prob {np.abs(a[1] - b[1]).max(initial=0):.1e}"



def padded_cfp(count: int, pad: float = 0.25) -> list[np.ndarray]:
    files = sorted((ASSETS / "cfp" / "cfp-dataset" / "Data" / "Images").glob("*/frontal/01.jpg"))[:count]
    images = []
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        border = int(pad * max(image.shape[:2]))
        images.append(cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_CONSTANT, value=0))
    return images


def bench_cfp(args: argparse.Namespace) -> None:
    """Whole passes over N padded CFP images, one image per call, configurations in turns; median seconds."""
    torch.set_num_threads(args.threads)
    images = padded_cfp(args.cfp)
    det = create_mtcnn(order="area")
    batch = args.cfp_batch
    batched_name = f"facepipe, {batch}/call"
    def batched_run() -> object:
        return [det.detect(images[i:i + batch]) for i in range(0, len(images), batch)]

    def batched_unpacked() -> object:  # every pyramid level in a P-Net pass of its own, as before the packing
        packing, mtcnn_module.PACK_BELOW_PIXELS = mtcnn_module.PACK_BELOW_PIXELS, 0
        try:
            return batched_run()
        finally:
            mtcnn_module.PACK_BELOW_PIXELS = packing

    configs: dict[str, Callable[[], object]] = {
        "facepipe, 1/call": lambda: [det.detect([image]) for image in images],
        batched_name: batched_run,
        f"{batch}/call, unpacked": batched_unpacked,
        "straightforward": lambda: [straightforward_detect(det, image) for image in images],
    }
    reference = facenet_pytorch_detect()
    if reference is not None:
        configs["facenet-pytorch"] = lambda: [reference(image) for image in images]
    with torch.inference_mode():
        ours = [det.detect_arrays([image])[0] for image in images]
        batched = [r for i in range(0, len(images), batch) for r in det.detect_arrays(images[i:i + batch])]
        theirs = [straightforward_detect(det, image) for image in images]
        timings = time_round_robin(configs, args.runs, args.warmup)
    print(f"{len(images)} padded CFP frontal images, torch threads {args.threads} "
          f"(facepipe's {batch}/call runs its images on {args.threads} threads of 1), median of {args.runs} passes")
    base = timings["straightforward"]
    for name, seconds in timings.items():
        print(f"{name:<22}{seconds / 1000:>8.2f} s{len(images) * 1000 / seconds:>8.2f} img/s"
              f"{base / seconds:>8.2f}x the straightforward cascade")
    print(f"small levels packed into one P-Net pass: {timings[f'{batch}/call, unpacked'] / timings[batched_name]:.2f}x "
          f"the unpacked {batch}/call time")
    for name, results in (("1/call", ours), (f"{batch}/call", batched)):
        same = sum(a[0].shape == b[0].shape for a, b in zip(results, theirs))
        worst = max((np.abs(a[0] - b[0]).max(initial=0) for a, b in zip(results, theirs) if a[0].shape == b[0].shape), default=0)
        print(f"facepipe {name} vs straightforward: same face count on {same}/{len(images)} images, "
              f"max box difference {worst:.1e} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, default=ASSETS / "images" / "group" / "t1.jpg")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="images per call in the batched configuration")
    parser.add_argument("--cfp-batch", type=int, default=32, help="images per call in --cfp's batched row "
                        "(eval cfp / compare-detectors pass 32)")
    parser.add_argument("--cfp", type=int, default=0, metavar="N",
                        help="instead of --image: the first N CFP frontal images with eval cfp's black border (0.25), "
                             "the workload of `facepipe eval compare-detectors`; one image per call")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    if args.cfp:
        bench_cfp(args)
        return

    torch.set_num_threads(args.threads)
    image = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"cannot read {args.image}")
    det = create_mtcnn(order="area", batch_size=args.batch)
    print(f"{args.image.name} {image.shape[1]}x{image.shape[0]}, torch threads {args.threads}, "
          f"median of {args.runs} runs, ms per image")

    batch = [image] * args.batch
    batched_name = f"facepipe, {args.batch} images/call"
    configs: dict[str, Callable[[], object]] = {
        "facepipe, 1 image/call": lambda: det.detect([image]),
        batched_name: lambda: det.detect(batch),
        "straightforward": lambda: straightforward_detect(det, image),
    }
    reference = facenet_pytorch_detect()
    if reference is not None:
        configs["facenet-pytorch"] = lambda: reference(image)
    else:
        print("(facenet-pytorch not importable: reference package row skipped)")
    with torch.inference_mode():
        ours = det.detect_arrays([image])[0]
        results = {
            "facepipe, 1 image/call": ours,
            batched_name: det.detect_arrays(batch)[-1],
            "straightforward": straightforward_detect(det, image),
        }
        if reference is not None:
            results["facenet-pytorch"] = reference(image)
        timings = time_round_robin(configs, args.runs, args.warmup)
    timings[batched_name] /= args.batch
    rows = [(name, timings[name], results[name]) for name in configs]

    base = rows[0][1]
    print(f"{'configuration':<28}{'ms/image':>10}{'vs 1 image/call':>17}  faces  agreement with 1 image/call")
    for name, ms, result in rows:
        print(f"{name:<28}{ms:>10.1f}{ms / base:>16.2f}x  {len(result[1]):>5}  {max_difference(result, ours)}")


if __name__ == "__main__":
    main()
