"""``facepipe detect``: faces of every image as JSON lines, optionally pictures with the detections drawn."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import click
import numpy as np
from tqdm import tqdm

from facepipe.commands.common import (
    apply_pack,
    check_detector_precision,
    detect_weights_option,
    detector_option,
    device_option,
    min_score_option,
    pack_option,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
)
from facepipe.detection.base import pipeline_detector_options
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
    """Files as given, folders walked recursively for image files.

    Output names mirror the input tree below the folder that holds all inputs (one folder given: its own
    tree), so same-named files from different folders keep their folders; a file given twice gets ``_1``.
    """
    given_paths = [Path(p) for p in inputs]
    base = _common_folder(given_paths)
    found: list[InputImage] = []
    taken: set[Path] = set()
    for given in given_paths:
        paths = list_images(given) if given.is_dir() else [given]  # a missing file is reported as an error line
        for path in paths:
            found.append(InputImage(path, _unique(_relative_to(path, base), taken)))
    return found


def _common_folder(given: Sequence[Path]) -> Path | None:
    folders = [os.path.abspath(p if p.is_dir() else p.parent) for p in given]
    try:
        return Path(os.path.commonpath(folders)) if folders else None
    except ValueError:  # different drives
        return None


def _relative_to(path: Path, base: Path | None) -> Path:
    absolute = Path(os.path.abspath(path))
    if base is not None and absolute.is_relative_to(base):
        return absolute.relative_to(base)
    return Path(path.name)


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
    detector: str, batch_size: int, threshold: float | None = None, scale: str | None = None, precision: str = "fp32",
    device: str = "cpu",
) -> dict:
    """Factory options for ``create_detector``: RetinaFace and SCRFD take a score threshold and a scale policy;
    RetinaFace also a reduced precision (``commands.common.check_detector_precision``: one line for a detector
    or CPU that cannot run it).

    ``scale`` None is each detector's default: RetinaFace runs the original size, SCRFD letterboxes to its
    ``det_size`` (insightface's test, also called ``fixed``); SCRFD's ``original`` runs the image unresized.
    """
    options: dict = {"batch_size": batch_size}
    check_detector_precision(precision, detector, device)
    if precision != "fp32":
        options["precision"] = precision
    if detector.startswith("retinaface") or detector == "scrfd":
        if threshold is not None:
            options["threshold"] = threshold
    if detector.startswith("retinaface"):
        options["scale"] = scale or "original"
    elif detector == "scrfd":
        if scale == "multiscale":
            raise click.UsageError("--scale multiscale is a RetinaFace policy; SCRFD takes original or fixed (det_size)")
        options["scale"] = "original" if scale == "original" else "letterbox"
    elif scale not in (None, "original"):
        raise click.UsageError(f"--scale {scale} is only available for the RetinaFace and SCRFD detectors")
    return options


class _Stop:
    """SIGTERM while detect writes stops it the way Ctrl-C does (no stray ``.partial`` file); remembers which came."""

    def __init__(self) -> None:
        self.signum = signal.SIGINT

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = signum
        raise KeyboardInterrupt


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
@detect_weights_option
@pack_option
@min_score_option
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
    detector_weights: str | None,
    pack: Path | None,
    min_score: float,
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

    --visualize mirrors the input tree (below the folder holding all inputs) with the detections drawn; a
    picture that cannot be written (e.g. its name is too long) adds "visualize_error" to its line.
    """
    set_threads(threads)
    detector, detector_weights = apply_pack(pack, detector, detector_weights)
    sources = collect_inputs(inputs)
    if not sources:
        raise click.UsageError("no image files found in the given inputs")
    options = pipeline_detector_options(detector, detector_options(detector, batch_size, min_score, precision=precision, device=device))
    model = build_detector(detector, detector_weights, device, **options)

    out.parent.mkdir(parents=True, exist_ok=True)
    if visualize is not None:
        try:
            visualize.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.BadParameter(f"cannot create {visualize}: {exc.strerror or exc}", param_hint="--visualize") from None
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    n_faces = n_errors = n_unwritten = 0
    stop = _Stop()
    previous_sigterm = signal.signal(signal.SIGTERM, stop)
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
                        faces = [f for f in result if f.score >= min_score]
                        height, width = item.image.shape[:2]
                        record.update(width=width, height=height, faces=[f.to_dict() for f in faces])
                        n_faces += len(faces)
                        if visualize is not None:
                            problem = _save_picture(_visual_path(visualize, item.source.relative), item.image, faces)
                            if problem is not None:
                                record["visualize_error"] = problem
                                n_unwritten += 1
                    n_errors += "error" in record
                    handle.write(json.dumps(record) + "\n")
                progress.update(len(batch))
        os.replace(partial, out)
    except KeyboardInterrupt:
        partial.unlink(missing_ok=True)
        name = signal.Signals(stop.signum).name
        click.echo(f"interrupted ({name}): nothing written to {out} (detect writes it whole at the end); "
                   "rerun the same command", err=True)
        raise SystemExit(128 + stop.signum) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    click.echo(f"{len(sources)} images, {n_faces} faces, {n_errors} errors -> {out}", err=True)
    if n_unwritten:
        click.echo(f"{n_unwritten} pictures could not be written under {visualize} (see 'visualize_error' in {out})", err=True)


def _save_picture(path: Path, image: np.ndarray, faces: list[Face]) -> str | None:
    """Draw and save one picture; a problem with this one file (name too long, disk full) is returned, not raised."""
    from facepipe.visualize import draw_faces, save_image

    try:
        save_image(path, draw_faces(image, faces))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot write {path}: {reason}"
    return None
