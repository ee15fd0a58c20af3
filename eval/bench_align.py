"""End-to-end throughput of ``facepipe align`` against a FaceAnalysis-style baseline, in the same run.

Baseline (what insightface ``FaceAnalysis.get`` + ``norm_crop`` does): one image at a time in one process,
read -> detect -> keep the largest face -> norm_crop -> encode and write, with the same RetinaFace weights and
settings and the default thread count. Pipeline: ``run_align`` (worker processes with a per-process thread
budget, batched detection, chunked commits, manifest). Both write JPEG crops of the same faces.

    .venv/bin/python eval/bench_align.py                    # WIDER subset (323) + 300 CFP images
    .venv/bin/python eval/bench_align.py --limit 40         # quick check
    .venv/bin/python eval/bench_align.py --ceiling          # + what 2 cores allow (1-thread loop, cold start-up)
    .venv/bin/python eval/bench_align.py --precision bf16 --stages 100   # + per-stage ms per image, fp32 and bf16

The detector's network is ~90% of the work and the baseline already runs it on every core (onnxruntime
threads), so a process per core can only win what a second thread does not (2 x one-thread rate vs the
multi-thread rate), less its start-up (forkserver importing torch, each worker exporting the network):
``--ceiling`` prints both, so the ratio can be read against what the machine allows.

Prints images/s of both, the ratio, and peak resident memory (the baseline's process; the pipeline's main
process and its largest worker). Figures on a loaded machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from facepipe.alignment import norm_crop
from facepipe.engine.local import default_workers
from facepipe.io.images import read_image
from facepipe.alignment import estimate_norm, warp_crops
from facepipe.pipeline.align import AlignConfig, align_confidence_threshold, align_detector, decode_item, encode_crop, run_align
from facepipe.pipeline.face_choice import choose_faces
from facepipe.pipeline.sources import FileSource
from facepipe.quality import laplacian_sharpness

ASSETS = Path(os.environ.get("FACEPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets"


def _max_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


class DescendantPeakMemory(threading.Thread):
    """Samples the peak RSS (VmHWM) of every descendant process from /proc: the pipeline's workers are forked
    by a forkserver, so they are not this process's children and RUSAGE_CHILDREN never sees them."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.25):
            for pid in self._descendants():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peaks[pid] = max(self.peaks.get(pid, 0.0), int(line.split()[1]) / 1024.0)

    @staticmethod
    def _descendants() -> set[int]:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        found, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
            found |= frontier
        return found

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def collect_images(limit: int | None) -> tuple[list[Path], Path]:
    wider = sorted((ASSETS / "widerface" / "val_images").rglob("*.jpg"))
    cfp = sorted((ASSETS / "cfp" / "cfp-dataset" / "Data" / "Images").rglob("*.jpg"))[::23][:300]
    images = wider + cfp
    if not images:
        sys.exit(f"no benchmark images under {ASSETS}: set FACEPIPE_SHARED")
    if limit:
        # interleave so a short run still mixes large WIDER photos and small CFP portraits
        images = [img for pair in zip(wider, cfp) for img in pair][:limit]
    return images, ASSETS


def baseline(paths: list[Path], root: Path, out_dir: Path, config: AlignConfig) -> float:
    from facepipe.detection import create_detector

    start = time.perf_counter()
    detector = create_detector(config.detector, config.detector_weights, config.device, **config.detector_options)
    for path in paths:
        try:
            image = read_image(path)
        except ValueError:
            continue
        faces = choose_faces(detector.detect([image])[0], image.shape, config.keep, config.min_score)
        for face in faces:
            crop = norm_crop(image, face.landmarks, config.size)
            target = out_dir / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), crop, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
    return time.perf_counter() - start


STAGES = ("read+decode", "detect: preprocess", "detect: network", "detect: decode+NMS+faces", "warp+sharpness", "encode")
NEW_SHAPE = "  of which new-shape set-up"


def stage_seconds(paths: list[Path], root: Path, config: AlignConfig, precision: str) -> dict[str, float]:
    """Seconds per image of each stage of align's worker, one thread, each image once and one at a time (as a
    worker meets them), with a detector of ``precision``.

    The stages call what the worker calls (``decode_item``, the align detector, ``warp_crops``,
    ``laplacian_sharpness``, ``encode_crop``). The network is timed alone on the image's input, the first time
    its shape is run: a runtime sets itself up for each new input shape (OpenVINO much more than onnxruntime),
    and images of a real run rarely share one. Running it again gives that set-up (``NEW_SHAPE``); the rest of
    ``detect()`` (then at a warm shape) minus preprocessing and the warm network is decoding, NMS and Faces."""
    options = {**config.detector_options, "intra_op_threads": 1, "precision": precision}
    detector = align_detector(replace(config, detector_options=options))
    retinaface = detector.detector  # inside the DownscalingDetector (no image here is over its limit)
    source = FileSource(paths, root, "stages")
    spent = dict.fromkeys((*STAGES, NEW_SHAPE), 0.0)
    for item in source.items():
        started = time.perf_counter()
        image = decode_item(source, item, config.max_pixels).image
        decoded = time.perf_counter()
        if image is None:
            continue
        batch = retinaface.preprocess([image])
        prepared = time.perf_counter()
        retinaface.backend(batch)
        first_run = time.perf_counter()
        retinaface.backend(batch)
        second_run = time.perf_counter()
        faces = choose_faces(detector.detect([image])[0], image.shape, config.keep, config.min_score)
        detected = time.perf_counter()
        crops = np.zeros((0, config.size, config.size, 3), np.uint8)
        if faces:
            crops = warp_crops(image, estimate_norm(np.stack([f.landmarks for f in faces]), config.size), config.size)
            laplacian_sharpness(crops)
        warped = time.perf_counter()
        for crop in crops:
            encode_crop(crop, config.image_format, config.jpeg_quality)
        encoded = time.perf_counter()
        preprocess, cold, warm = prepared - decoded, first_run - prepared, second_run - first_run
        spent["read+decode"] += decoded - started
        spent["detect: preprocess"] += preprocess
        spent["detect: network"] += cold
        spent[NEW_SHAPE] += max(0.0, cold - warm)
        spent["detect: decode+NMS+faces"] += max(0.0, (detected - second_run) - preprocess - warm)
        spent["warp+sharpness"] += warped - detected
        spent["encode"] += encoded - warped
    return {stage: seconds / len(paths) for stage, seconds in spent.items()}


def print_stages(paths: list[Path], root: Path, config: AlignConfig, precisions: list[str]) -> None:
    """The per-image stage table (ms) for each precision, and the stage that limits a worker."""
    cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        table = {p: stage_seconds(paths, root, config, p) for p in precisions}
    finally:
        cv2.setNumThreads(cv2_threads)
        torch.set_num_threads(torch_threads)
    print("per image, 1 thread (ms): " + " | ".join(f"{'stage':26s}" if i == 0 else p for i, p in enumerate(["", *precisions])))
    for stage in (*STAGES[:3], NEW_SHAPE, *STAGES[3:]):
        print(f"  {stage:26s} " + " | ".join(f"{1000 * table[p][stage]:7.2f}" for p in precisions))
    totals = {p: sum(table[p][stage] for stage in STAGES) for p in precisions}
    print(f"  {'total':26s} " + " | ".join(f"{1000 * totals[p]:7.2f}" for p in precisions))
    for p in precisions:
        total = totals[p]
        limit = max(STAGES, key=table[p].get)
        print(f"{p}: {limit} limits ({100 * table[p][limit] / total:.0f}% of a worker's time per image); "
              f"everything but the network: {1000 * (total - table[p]['detect: network']):.2f} ms")


_COLD_START = """
import json, sys
from pathlib import Path
from facepipe.pipeline.align import AlignConfig, run_align
from facepipe.pipeline.sources import FileSource
options, root, out, workers, *paths = sys.argv[1:]
config = AlignConfig(detector_options=json.loads(options))
summary = run_align(config, FileSource([Path(p) for p in paths], Path(root), "start-up"), out, workers=int(workers), progress=False)
print(summary.seconds)
"""


def cold_start_seconds(config: AlignConfig, paths: list[Path], root: Path, out_dir: Path, workers: int) -> float:
    """``run_align`` on a few images in a fresh process: worker start-up as a new ``facepipe align`` pays it
    (this process's forkserver, already running with torch imported, would hide most of it)."""
    command = [sys.executable, "-c", _COLD_START, json.dumps(config.detector_options), str(root), str(out_dir),
               str(workers), *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (interleaved WIDER/CFP)")
    parser.add_argument("--workers", type=int, default=None, help="pipeline worker processes (default: one per core)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                        help="RetinaFace backend for both (auto = onnxruntime on CPU)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure what the cores allow: the baseline loop on one thread (x workers = the best "
                             "a process-per-core pipeline can do) and the pipeline's start-up (run on 2 images)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="the pipeline's detector precision (README 'Reduced precision'); the baseline stays "
                             "onnxruntime fp32, as FaceAnalysis runs it")
    parser.add_argument("--stages", type=int, default=0, metavar="N",
                        help="also time each stage of a worker per image on 1 thread (fp32 and --precision) over N of the "
                             "images (interleaved WIDER/CFP) and say which limits")
    args = parser.parse_args()
    from facepipe.runtime.cpu import cpu_summary

    print(f"CPU: {cpu_summary()}")
    paths, root = collect_images(args.limit)
    # The baseline runs the detector exactly as the pipeline's workers build it (same threshold, same pre-NMS
    # filter at min-score as insightface's detector applies, same options).
    min_score = AlignConfig.min_score
    options = {"backend": args.backend, "threshold": min_score}
    options["confidence_threshold"] = align_confidence_threshold(min_score, options)
    config = AlignConfig(detector_options=options)
    pixels = sum(np.prod(cv2.imread(str(p), cv2.IMREAD_REDUCED_GRAYSCALE_8).shape) * 64 for p in paths) / len(paths)
    print(f"{len(paths)} images (mean {pixels / 1e6:.2f} MP), cores {os.cpu_count()}, RetinaFace-mnet bundled "
          f"weights, backend {args.backend}, pipeline precision {args.precision}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_seconds = baseline(paths, root, tmp / "baseline", config)
        base_rss = _max_rss_mb(resource.RUSAGE_SELF)
        source = FileSource(paths, root, "benchmark")
        sampler = DescendantPeakMemory()
        sampler.start()
        pipeline_config = config
        if args.precision != "fp32":
            pipeline_config = replace(config, detector_options={**config.detector_options, "precision": args.precision})
        summary = run_align(
            pipeline_config, source, tmp / "pipeline", workers=args.workers, batch_size=args.batch_size, progress=False
        )
        sampler.stop()
        child_rss = max(sampler.peaks.values(), default=0.0)
        base_rate = len(paths) / base_seconds
        pipe_rate = summary.images_per_second
        print(f"baseline (sequential detect + norm_crop): {base_rate:7.2f} images/s  ({base_seconds:.1f} s)")
        print(f"facepipe align pipeline                 : {pipe_rate:7.2f} images/s  ({summary.seconds:.1f} s, {summary.counts})")
        print(f"ratio pipeline / baseline               : {pipe_rate / base_rate:7.2f}x")
        print(f"peak RSS: baseline process {base_rss:.0f} MB (includes this script); largest pipeline worker {child_rss:.0f} MB "
              f"({len(sampler.peaks)} helper processes seen)")
        if args.ceiling:
            workers = args.workers or default_workers(config.device)
            startup = cold_start_seconds(config, paths[:2], root, tmp / "startup", workers)
            one_thread = replace(config, detector_options={**config.detector_options, "intra_op_threads": 1})
            cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
            cv2.setNumThreads(1)
            torch.set_num_threads(1)
            try:
                single_rate = len(paths) / baseline(paths, root, tmp / "single", one_thread)
            finally:
                cv2.setNumThreads(cv2_threads)
                torch.set_num_threads(torch_threads)
            best = workers * single_rate
            print(f"baseline loop on 1 thread               : {single_rate:7.2f} images/s")
            print(f"ceiling: {workers} workers x 1 thread, no start-up: {best:7.2f} images/s = {best / base_rate:.2f}x the baseline; "
                  f"pipeline start-up (2 images) {startup:.1f} s -> "
                  f"{len(paths) / (startup + len(paths) / best):.2f} images/s = "
                  f"{len(paths) / (startup + len(paths) / best) / base_rate:.2f}x with it")
    if args.stages:
        stage_paths, _ = collect_images(args.stages)
        print(f"stages over {len(stage_paths)} images:")
        print_stages(stage_paths, root, config, list(dict.fromkeys(["fp32", args.precision])))


if __name__ == "__main__":
    main()
