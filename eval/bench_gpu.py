"""GPU throughput of the detection and embedding paths (needs CUDA; prints a table).

    python eval/bench_gpu.py [--seconds 5]

Figures: RetinaFace MobileNet-0.25 full detect() (preprocess, network, decode, NMS) at VGA and 1080p, batch 1
and 16, fp32 and fp16; embedding images/s with flip test for MobileFaceNet and iresnet100 (random weights: speed
does not depend on them) at batch 256, fp32 and fp16. cuDNN benchmark mode on, TF32 off for fp32 (the
default facepipe uses for parity).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from facepipe.detection import create_detector
from facepipe.embedding import create_embedder

ASSETS = Path(os.environ.get("FACEPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets"


def timed(fn, seconds: float) -> float:
    """Median seconds per call after a warm-up, over at least `seconds` of calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    photo = cv2.imread(str(ASSETS / "images" / "group" / "t1.jpg"))
    print("\nRetinaFace mnet0.25, full detect()")
    print(f"{'size':<8}{'batch':>6}{'precision':>10}{'ms/image':>10}{'images/s':>10}")
    for label, (width, height) in (("VGA", (640, 480)), ("1080p", (1920, 1080))):
        image = cv2.resize(photo, (width, height))
        for fp16 in (False, True):
            detector = create_detector("retinaface", device="cuda", backend="torch", fp16=fp16, batch_size=16)
            for batch in (1, 16):
                images = [image] * batch
                seconds = timed(lambda: detector.detect(images), args.seconds) / batch
                print(f"{label:<8}{batch:>6}{'fp16' if fp16 else 'fp32':>10}{seconds * 1e3:>10.2f}{1 / seconds:>10.0f}")
    print("\nEmbedding with flip test (2 forward passes per crop), batch 256")
    print(f"{'model':<15}{'precision':>10}{'images/s':>10}")
    crops = np.random.default_rng(0).integers(0, 255, size=(256, 112, 112, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        from facepipe.models.iresnet import iresnet100

        torch.save(iresnet100().state_dict(), Path(tmp) / "backbone.pth")
        for name, weights in (("mobilefacenet", None), ("iresnet100", str(Path(tmp) / "backbone.pth"))):
            for fp16 in (False, True):
                embedder = create_embedder(name, weights=weights, device="cuda", fp16=fp16, batch_size=256)
                seconds = timed(lambda: embedder.embed(crops, flip=True), args.seconds)
                print(f"{name:<15}{'fp16' if fp16 else 'fp32':>10}{len(crops) / seconds:>10.0f}")


if __name__ == "__main__":
    main()
