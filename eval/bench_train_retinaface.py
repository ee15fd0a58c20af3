"""Training-step speed of RetinaFace (MobileNet-0.25 / ResNet-50) on real WIDER batches, CPU or CUDA.

Times ``Trainer.train_step`` (forward, multibox loss with matching and OHEM, backward, SGD step) on batches
prepared in advance, so that the figure is the compute cost; then the DataLoader alone (decode + augment)
with the given number of workers, to see whether data would starve the step. On CUDA the step is timed
both in fp32 and with mixed precision (autocast fp16 + GradScaler) and the ratio printed.

    .venv/bin/python eval/bench_train_retinaface.py --iters 5                       # CPU, quick
    .venv/bin/python eval/bench_train_retinaface.py --device cuda --batch-size 32 --workers 8

Figures on a loaded machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from facepipe.train.data import read_annotations
from facepipe.train.trainer import TrainConfig, Trainer

ASSETS = Path(os.environ.get("FACEPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, batches: list, iters: int, warmup: int) -> list[float]:
    seconds = []
    for i in range(warmup + iters):
        images, targets = batches[i % len(batches)]
        _sync(trainer.device)
        started = time.perf_counter()
        trainer.train_step(images, targets, lr=1e-4)
        _sync(trainer.device)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet0.25", choices=["mobilenet0.25", "resnet50"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    samples = read_annotations(
        "wider-mat", ASSETS / "widerface" / "wider_face_val.mat", ASSETS / "widerface" / "val_images"
    )
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size, epochs=1,
            device=args.device, num_workers=args.workers, amp=False,
        )
        trainer = Trainer(config, samples, scratch)
        loader_started = time.perf_counter()
        batches = []
        for batch in trainer._loader(epoch=0):
            batches.append(batch)
            if len(batches) == max(args.iters, 4):
                break
        loader_seconds = time.perf_counter() - loader_started
        images_loaded = sum(len(b[0]) for b in batches)
        print(f"{args.backbone} {args.image_size}px batch {args.batch_size} on {args.device}"
              f" (torch threads {torch.get_num_threads()}, workers {args.workers})")
        print(f"data loader: {images_loaded / loader_seconds:.1f} img/s (decode + augment, incl. worker start)")

        fp32 = time_steps(trainer, batches, args.iters, args.warmup)
        fp32_median = statistics.median(fp32)
        print(f"train step fp32: {fp32_median:.3f} s/iter median, {args.batch_size / fp32_median:.1f} img/s")
        if trainer.device.type == "cuda":
            amp_trainer = Trainer(replace(config, amp=True), samples, scratch)
            amp = time_steps(amp_trainer, batches, args.iters, args.warmup)
            amp_median = statistics.median(amp)
            print(f"train step amp : {amp_median:.3f} s/iter median, {args.batch_size / amp_median:.1f} img/s,"
                  f" {fp32_median / amp_median:.2f}x fp32")
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(trainer.device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
