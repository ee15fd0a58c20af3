"""``facepipe align``: detect (or read landmarks), align and write crops for a whole data set."""

from __future__ import annotations

import os
from pathlib import Path

import click

from facepipe.commands.common import (
    apply_pack,
    check_detector_precision,
    detector_option,
    detector_weights_option,
    device_option,
    min_score_option,
    pack_option,
    precision_option,
    resolve_device,
)
from facepipe.engine.cli_options import engine_option, engine_options, num_gpus_option, ray_address_option


def _parse_size(value: str) -> int | tuple[int, int]:
    """``112`` (square) or ``HxW`` such as ``112x96``; sides must be positive."""
    try:
        if "x" in value.lower():
            height, width = (int(v) for v in value.lower().split("x"))
            size: int | tuple[int, int] = height if height == width else (height, width)
        else:
            height = width = int(value)
            size = height
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a size like 112, 224 or 112x96", param_hint="--size") from None
    if height < 1 or width < 1:
        raise click.BadParameter(f"{value!r}: sides must be positive", param_hint="--size")
    return size


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (crops, manifest.parquet, resumable run state in .facepipe/).")
@click.option("--sink", type=click.Choice(["dir", "recordio", "tar"]), default="dir", show_default=True,
              help="dir: a tree mirroring the input; recordio: insightface train.rec/.idx; tar: one tar shard per chunk.")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Manifest parquet path [default: OUT/manifest.parquet].")
@click.option("--size", default="112", show_default=True, help="Crop size: 112, a multiple of 112 or 128, or 112x96.")
@click.option("--keep", type=click.Choice(["largest", "center", "best", "all"]), default="largest", show_default=True,
              help="Which face(s) to crop per image; 'all' writes name_0, name_1, ...")
@min_score_option
@click.option("--landmarks", "landmarks_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Align from 5-point landmarks in a file (SphereFace LFW or IJB-C name_5pts_score format) instead of detecting.")
@click.option("--retry-padded/--no-retry-padded", default=False, show_default=True,
              help="Retry images with no face on a black-padded copy (for tight or already aligned crops).")
@click.option("--pad-ratio", type=float, default=0.5, show_default=True, help="Padding per side, as a fraction of the longest side.")
@click.option("--format", "image_format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True)
@click.option("--jpeg-quality", type=click.IntRange(0, 100), default=95, show_default=True)
@click.option("--max-pixels", type=click.IntRange(min=1), default=50_000_000, show_default=True,
              help="Pixel budget per decoded image: larger JPEGs are decoded at 1/2..1/8 size, other formats refused.")
@click.option("--detect-max-side", type=click.IntRange(min=0), default=2560, show_default=True,
              help="Images with a longer side are downscaled for detection only (crops come from the full image); 0 = never.")
@detector_option
@detector_weights_option
@pack_option
@precision_option
@click.option("--detector-option", "detector_options", multiple=True, metavar="KEY=VALUE",
              help="Extra detector setting, repeatable, e.g. scale=fixed, backend=torch, max_size=1600.")
@device_option
@click.option("--workers", type=int, default=None, help="Worker processes [default: one per core on CPU, 2 on CUDA]; 0 = in-process.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per detection batch.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per committed chunk (the unit of resume).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="For a file-list INPUT: folder that relative paths (and output names) are relative to.")
@click.option("--overwrite", is_flag=True,
              help="Start over even if OUT holds a run with other settings (deletes the crops that run wrote first).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_option
@ray_address_option
@num_gpus_option
def align(
    input_path: Path, out_dir: Path, sink: str, manifest_path: Path | None, size: str, keep: str, min_score: float,
    landmarks_file: Path | None, retry_padded: bool, pad_ratio: float, image_format: str, jpeg_quality: int,
    max_pixels: int, detect_max_side: int, detector: str, detector_weights: str | None, pack: Path | None,
    detector_options: tuple[str, ...], device: str,
    workers: int | None, batch_size: int, chunk_size: int, root: Path | None, overwrite: bool, progress: bool,
    engine: str = "local", ray_address: str | None = None, num_gpus: float | None = None, precision: str = "fp32",
) -> None:
    """Align every image of INPUT (a folder tree, an image, a .txt/.lst list of paths, or a train.rec).

    Writes one crop per kept face and a manifest row per input (status ok / no_face / error with its reason).
    Rerunning with the same options resumes: finished chunks are skipped, new inputs are aligned, and the outputs
    of inputs that are gone are removed.
    """
    from facepipe.engine.local import RunInterrupted, WorkerSetupError, run_job
    from facepipe.engine.ray_engine import RayEngineError
    from facepipe.io.recordio import RecordIOError
    from facepipe.models.checkpoint import CheckpointError
    from facepipe.pipeline.align import AlignConfig, AlignJob
    from facepipe.pipeline.landmarks_file import LandmarksFileError
    from facepipe.pipeline.manifest import RunStateError
    from facepipe.pipeline.sources import SourceError, open_source

    ray_options = engine_options(engine, ray_address, num_gpus, actors=workers)
    if ray_options is None:
        device = resolve_device(device)  # on Ray, actors get GPUs through --num-gpus, not the driver's device
    if workers is not None and workers < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--workers")
    detector, detector_weights = apply_pack(pack, detector, detector_weights)
    check_detector_precision(precision, detector, device)
    try:
        config = AlignConfig(
            size=_parse_size(size), keep=keep, min_score=min_score, retry_padded=retry_padded, pad_ratio=pad_ratio,
            image_format=image_format, jpeg_quality=jpeg_quality, max_pixels=max_pixels,
            detect_max_side=detect_max_side or None, detector=detector, detector_weights=detector_weights,
            detector_options={**_parse_options(detector_options), **({"precision": precision} if precision != "fp32" else {})},
            landmarks_file=str(landmarks_file) if landmarks_file is not None else None, device=device,
        )
    except ValueError as exc:  # bad option values: nothing is created
        raise click.UsageError(str(exc)) from None
    _check_writable(out_dir)
    if manifest_path is not None:
        _check_writable(manifest_path.parent)
    try:
        source = open_source(input_path, root)
        with AlignJob(config, source, out_dir, sink, manifest_path, chunk_size, batch_size, overwrite) as job:
            summary = run_job(job, engine, workers, progress, **({"options": ray_options} if ray_options else {}))
    except RunInterrupted as exc:  # one line, no traceback; committed chunks stay
        click.echo(str(exc), err=True)
        click.get_current_context().exit(exc.exit_code)
    except (SourceError, LandmarksFileError, RunStateError, CheckpointError, RecordIOError, RayEngineError,
            WorkerSetupError) as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:  # disk full, read-only file system...: committed chunks stay, a rerun resumes
        raise click.ClickException(_os_error_line(exc)) from None
    click.echo(summary.format())


def _os_error_line(exc: OSError) -> str:
    import errno

    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC or "No space left on device" in str(exc):  # pyarrow's errors carry no errno
        return f"no space left on the device{where}; free some space and rerun the same command (finished chunks are kept)"
    return f"{exc.strerror or exc}{where}; finished chunks are kept, rerun the same command to resume"


def _parse_options(pairs: tuple[str, ...]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; values are read as JSON (numbers, booleans, lists) or else kept as strings."""
    import json

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--detector-option")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _check_writable(out_dir: Path) -> None:
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise click.ClickException(f"cannot write output: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise click.ClickException(f"cannot write output: no write permission on {existing}")
