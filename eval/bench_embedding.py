"""Embedding throughput: facepipe's torch embedders vs onnxruntime on the same exported model, same run.

For each model (MobileFaceNet with its bundled weights; iresnet100 with random weights, speed does not
depend on them) and batch size, measures images/s of:

* ``torch eager``: the bare ``nn.Module`` under ``torch.inference_mode`` (NCHW, no folding): the baseline any
  PyTorch user gets;
* ``facepipe``: ``TorchEmbedder`` (``--backend torch``: conv+BN folded with torch.fx, channels_last);
* ``onnxruntime``: the same weights exported with ``export_onnx`` and run by ``OnnxEmbedder`` (graph
  optimisations on, which fold BN too). This is also what ``facepipe embed`` runs by default on CPU
  (``--backend auto``), so facepipe's default path is at parity with onnxruntime by construction.

All with ``--threads`` threads (torch and onnxruntime), no flip, preprocessing included. Prints images/s and
the ratio facepipe / onnxruntime. On a machine shared with other jobs figures are noisy: compare the ratios
of one run, and re-run on a quiet machine for absolute numbers.

    .venv/bin/python eval/bench_embedding.py                       # both models, batch 1 and 32, 2 threads
    .venv/bin/python eval/bench_embedding.py --models mobilefacenet --min-seconds 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from facepipe.embedding.onnx_embedder import OnnxEmbedder, export_onnx
from facepipe.embedding.torch_embedder import TorchEmbedder, preprocess
from facepipe.models.registry import create_model, get_config


def images_per_second(run: Callable[[np.ndarray], object], crops: np.ndarray, min_seconds: float, min_repeats: int) -> float:
    run(crops)  # warm-up: allocations, oneDNN primitive creation
    done, started = 0, time.perf_counter()
    while True:
        run(crops)
        done += len(crops)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and done >= min_repeats * len(crops):
            return done / elapsed


def bench_model(name: str, batch_sizes: list[int], threads: int, min_seconds: float, min_repeats: int, workdir: Path) -> list[dict]:
    config = get_config(name)
    model = create_model(name).eval()  # mobilefacenet: bundled weights; iresnet: random (speed is the same)
    onnx_path = export_onnx(model, config, workdir / f"{name}.onnx")
    runtime = OnnxEmbedder(onnx_path, threads=threads, batch_size=max(batch_sizes))
    ours = TorchEmbedder(_clone(model, name), config, batch_size=max(batch_sizes))

    def eager(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(preprocess(crops, config))).numpy()

    rng = np.random.default_rng(0)
    rows = []
    for batch in batch_sizes:
        crops = rng.integers(0, 256, size=(batch, 112, 112, 3), dtype=np.uint8)
        check = np.abs(ours.embed(crops[:1], flip=False) - runtime.embed(crops[:1], flip=False)).max()
        row = {"model": name, "batch": batch, "max |facepipe - ort|": float(check)}
        for label, run in (
            ("torch eager", eager),
            ("facepipe", lambda c: ours.embed(c, flip=False)),
            ("onnxruntime", lambda c: runtime.embed(c, flip=False)),
        ):
            row[label] = images_per_second(run, crops, min_seconds, min_repeats)
        rows.append(row)
        print(
            f"{name:<14} batch {batch:>3}: torch eager {row['torch eager']:8.2f}  facepipe {row['facepipe']:8.2f}  "
            f"onnxruntime {row['onnxruntime']:8.2f} img/s   facepipe/ort {row['facepipe'] / row['onnxruntime']:.2f}x  "
            f"(max abs diff {check:.2e})",
            flush=True,
        )
    return rows


def _clone(model: torch.nn.Module, name: str) -> torch.nn.Module:
    clone = create_model(name)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilefacenet", "iresnet100"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="Minimum timed seconds per measurement.")
    parser.add_argument("--min-repeats", type=int, default=3, help="Minimum timed batches per measurement.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from facepipe.runtime.cpu import cpu_summary

    print(f"CPU: {cpu_summary()}")
    print(f"torch {torch.__version__}, {args.threads} threads, no flip, preprocessing included; load average "
          f"{os.getloadavg()[0]:.1f} (figures are noisy when the machine is shared)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.models:
            rows += bench_model(name, args.batch_sizes, args.threads, args.min_seconds, args.min_repeats, Path(tmp))
    print("\nmodel          batch   torch eager   facepipe   onnxruntime   facepipe/ort   facepipe/eager")
    for r in rows:
        print(f"{r['model']:<14} {r['batch']:>5} {r['torch eager']:13.2f} {r['facepipe']:10.2f} {r['onnxruntime']:13.2f} "
              f"{r['facepipe'] / r['onnxruntime']:14.2f} {r['facepipe'] / r['torch eager']:16.2f}")


if __name__ == "__main__":
    main()
