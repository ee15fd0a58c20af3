"""``facepipe detect``: faces of every image as JSON lines, optionally pictures with the detections drawn."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import click
import numpy as np
from tqdm import tqdm

from facepipe.commands.common import (
    detector_option,
    device_option,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
)
from facepipe.io.images import IMAGE_EXTENSIONS, ImageDecodeError, list_images, read_image
from facepipe.types import Face


@dataclass(frozen=True)
class InputImage:
    path: Path  # as found (given on the command line or walked from a given folder)
    relative: Path  # where its picture goes under --visualize


@dataclass
class LoadedImage:
    source: InputImage
    image: np.ndarray | None
    error: str | None


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[InputImage]:
    """Files as given, folders walked recursively for image files; output names unique per run."""
    found: list[InputImage] = []
    taken: set[Path] = set()
    for given in map(Path, inputs):
        if given.is_dir():
            pairs = [(p, p.relative_to(given)) for p in list_images(given)]
        else:  # a file, or a missing path that will be reported as an error line
            pairs = [(given, Path(given.name))]
        for path, relative in pairs:
            found.append(InputImage(path, _unique(relative, taken)))
    return found


def _unique(relative: Path, taken: set[Path]) -> Path:
    candidate, n = relative, 1
    while candidate in taken:
        candidate = relative.with_name(f"{relative.stem}_{n}{relative.suffix}")
        n += 1
    taken.add(candidate)
    return candidate


def _load(source: InputImage) -> LoadedImage:
    try:
        return LoadedImage(source, read_image(source.path), None)
    except ImageDecodeError as exc:
        return LoadedImage(source, None, str(exc))


def iter_loaded_batches(
    sources: Sequence[InputImage], batch_size: int, load: Callable[[InputImage], LoadedImage] = _load
) -> Iterator[list[LoadedImage]]:
    """Decoded batches in input order; the next batch is decoded in a thread while the caller works."""
    batches = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future = pool.submit(lambda b: [load(s) for s in b], batches[0])
        for next_batch in batches[1:] + [None]:
            current = pending.result()
            if next_batch is not None:
                pending = pool.submit(lambda b: [load(s) for s in b], next_batch)
            yield current


def detect_batch(detector, images: list[np.ndarray]) -> list[list[Face] | Exception]:
    """Detect on a batch; if the batch fails, retry image by image so one bad image costs only its own line."""
    try:
        return list(detector.detect(images))
    except Exception:  # noqa: BLE001 - isolated below, each failure is reported on its own line
        if len(images) == 1:
            raise
    results: list[list[Face] | Exception] = []
    for image in images:
        try:
            results.append(detector.detect([image])[0])
        except Exception as exc:  # noqa: BLE001
            results.append(exc)
    return results


def detector_options(
    detector: str, batch_size: int, threshold: float | None = None, scale: str = "original", precision: str = "fp32"
) -> dict:
    """Factory options for ``create_detector``; only RetinaFace takes a score threshold, a scale policy and a
    reduced precision."""
    options: dict = {"batch_size": batch_size}
    if precision != "fp32":
        if not detector.startswith("retinaface"):
            raise click.UsageError(f"--precision {precision} is for the RetinaFace detectors; {detector} runs fp32")
        options["precision"] = precision
    if detector.startswith("retinaface"):
        options["scale"] = scale
        if threshold is not None:
            options["threshold"] = threshold
    elif scale != "original":
        raise click.UsageError(f"--scale {scale} is only available for the RetinaFace detectors")
    return options


def build_detector(name: str, weights: str | None, device: str, **options):
    """``create_detector`` with configuration problems (bad weights file, wrong option) as CLI errors."""
    from facepipe.detection import create_detector

    try:
        return create_detector(name, weights=weights, device=resolve_device(device), **options)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # CheckpointError is a ValueError
        raise click.ClickException(f"cannot build detector {name!r}: {exc}") from None


def _visual_path(root: Path, relative: Path) -> Path:
    suffix = relative.suffix.lower()
    return root / (relative if suffix in IMAGE_EXTENSIONS and suffix not in {".tif", ".tiff"} else relative.with_suffix(".png"))


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGES_OR_DIRS...")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .jsonl file.")
@detector_option
@click.option(
    "--weights", "--detector-weights", "weights", type=click.Path(dir_okay=False, exists=True), default=None,
    help="Detector weights (.pth or .onnx); default: the bundled weights where available.",
)
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Minimum face score.")
@click.option(
    "--visualize", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder for copies of the images with boxes, scores and landmarks drawn.",
)
@device_option
@threads_option
@precision_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per detector call.")
def detect(
    inputs: tuple[Path, ...],
    out: Path,
    detector: str,
    weights: str | None,
    threshold: float,
    visualize: Path | None,
    device: str,
    threads: int | None,
    precision: str,
    batch_size: int,
) -> None:
    """Detect faces in IMAGES_OR_DIRS (folders are walked recursively).

    Writes one JSON line per image: {"path", "width", "height", "faces": [{"box": [x1, y1, x2, y2], "score",
    "landmarks": [[x, y] x 5]}]}; an unreadable image gets {"path", "error"} and the run goes on. The file
    appears under its name only when the run is complete.
    """
    from facepipe.visualize import draw_faces, save_image

    set_threads(threads)
    sources = collect_inputs(inputs)
    if not sources:
        raise click.UsageError("no image files found in the given inputs")
    model = build_detector(detector, weights, device, **detector_options(detector, batch_size, threshold, precision=precision))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    n_faces = n_errors = 0
    try:
        with open(partial, "w") as handle, tqdm(total=len(sources), unit="img", desc="detect") as progress:
            for batch in iter_loaded_batches(sources, batch_size):
                images = [item.image for item in batch if item.image is not None]
                results = iter(detect_batch(model, images) if images else [])
                for item in batch:
                    record: dict = {"path": str(item.source.path)}
                    result = next(results) if item.image is not None else None
                    if item.error is not None:
                        record["error"] = item.error
                    elif isinstance(result, Exception):
                        record["error"] = f"detection failed: {type(result).__name__}: {result}"
                    else:
                        faces = [f for f in result if f.score >= threshold]
                        height, width = item.image.shape[:2]
                        record.update(width=width, height=height, faces=[f.to_dict() for f in faces])
                        n_faces += len(faces)
                        if visualize is not None:
                            save_image(_visual_path(visualize, item.source.relative), draw_faces(item.image, faces))
                    n_errors += "error" in record
                    handle.write(json.dumps(record) + "\n")
                progress.update(len(batch))
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    click.echo(f"{len(sources)} images, {n_faces} faces, {n_errors} errors -> {out}", err=True)
