"""``facepipe embed``: aligned crops (or, with ``--detect``, raw photos) -> sharded .npy embeddings + parquet
manifest (resumable; a grown input embeds only what is new)."""

from __future__ import annotations

from pathlib import Path

import click

from facepipe.commands.common import (
    apply_pack_models,
    pack_recognition,
    detector_option,
    detector_weights_option,
    device_option,
    min_score_option,
    model_option,
    pack_option,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
    weights_option,
)
from facepipe.pipeline.face_choice import KEEP_MODES
from facepipe.engine.cli_options import engine_option, engine_options, num_gpus_option, ray_address_option


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Embedding folder: shards/emb-NNNNNN.npy, manifest.parquet, run.json.")
@model_option
@weights_option
@pack_option
@click.option("--flip/--no-flip", default=True, show_default=True, help="Add the embedding of the mirrored crop.")
@click.option("--normalize/--raw", "normalize", default=True, show_default=True,
              help="Store L2-normalised vectors (the raw norm is kept in the manifest either way) or raw ones.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Crops per model batch [default: 64]; with --detect, photos per detection batch [default: 8].")
@click.option("--shard-size", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Crops (with --detect: photos) per .npy shard (the unit of resume).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="Runtime for mobilefacenet / iresnet*: auto = onnxruntime on CPU (our weights exported once and "
                   "cached; faster and robust to CPU contention), torch on CUDA.")
@click.option("--fp16", is_flag=True, help="fp16 autocast (CUDA, torch models).")
@click.option("--onnx-preset", type=click.Choice(["insightface", "faceplugin"]), default=None,
              help="Input convention of a known ONNX family (default: read from the graph, insightface rule).")
@click.option("--input-format", type=click.Choice(["RGB", "BGR"]), default=None, help="ONNX: override colour order.")
@click.option("--mean", type=float, default=None, help="ONNX: override input mean (pixel units).")
@click.option("--std", type=float, default=None, help="ONNX: override input std (pixel units).")
@click.option("--detect", is_flag=True,
              help="INPUT holds raw photos: detect, choose, align (in memory) and embed them in one pass.")
@detector_option
@detector_weights_option
@click.option("--detector-option", "detector_options", multiple=True, metavar="KEY=VALUE",
              help="--detect: extra detector setting, repeatable, e.g. scale=fixed, backend=torch.")
@click.option("--keep", type=click.Choice(KEEP_MODES), default="largest", show_default=True,
              help="--detect: which face(s) of a photo to embed; 'all' gives rows <photo>#0, #1, ...")
@min_score_option
@click.option("--pad-ratio", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="--detect: black border per side for detection, as a fraction of the longer side (tight crops).")
@device_option
@threads_option
@precision_option
@click.option("--overwrite", is_flag=True, help="Start over even if OUT holds a run with other settings.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_option
@ray_address_option
@num_gpus_option
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="--engine ray: model actors [default: one per GPU share, or per CPU but one].")
def embed(
    input_path: Path, out_dir: Path, model: str, weights: str | None, pack: Path | None, flip: bool, normalize: bool, dtype: str,
    batch_size: int | None, shard_size: int, backend: str, fp16: bool, onnx_preset: str | None,
    input_format: str | None, mean: float | None, std: float | None, detect: bool, detector: str,
    detector_weights: str | None, detector_options: tuple[str, ...], keep: str, min_score: float, pad_ratio: float,
    device: str, threads: int | None, overwrite: bool, progress: bool,
    engine: str = "local", ray_address: str | None = None, num_gpus: float | None = None, actors: int | None = None,
    precision: str = "fp32",
) -> None:
    """Embed every aligned crop of INPUT: a folder of crops, or what `facepipe align` wrote with any --sink
    (folder, train.rec with its labels.tsv, tar shards). With --detect, INPUT holds raw photos (a folder tree, an
    image, a .txt/.lst list, a train.rec): they are detected, aligned and embedded in one pass, and the manifest
    gets the detection columns (source, box, landmarks; the score in det_score).

    Identity = the crop's (photo's) whole folder path; detector scores are carried from the align manifest when
    present. Rerunning with the same options resumes and embeds only inputs no finished shard holds (a grown
    input: only the new ones; removed inputs leave the manifest).
    """
    from facepipe.commands.align import _parse_options as parse_options  # the one KEY=VALUE reader
    from facepipe.embedding.photos import DetectSpec, embed_photos_job
    from facepipe.embedding.store import EmbeddingStoreError, EmbedSpec, embed_directory_job
    from facepipe.engine.local import RunInterrupted, run_job
    from facepipe.engine.ray_engine import RayEngineError
    from facepipe.models.checkpoint import CheckpointError
    from facepipe.pipeline.sources import SourceError

    ray_options = engine_options(engine, ray_address, num_gpus, actors=actors)
    if ray_options is None:
        if actors is not None:
            raise click.UsageError("--actors only applies to --engine ray")
        device = resolve_device(device)  # on Ray, actors get GPUs through --num-gpus, not the driver's device
    set_threads(threads)
    detection_given = [name for name, given in (
        ("--detector", detector != "retinaface"), ("--detector-weights", detector_weights is not None),
        ("--detector-option", bool(detector_options)), ("--keep", keep != "largest"), ("--min-score", min_score != 0.5),
        ("--pad-ratio", pad_ratio != 0.0)) if given]
    if detection_given and not detect:
        raise click.UsageError(f"{', '.join(detection_given)} only apply with --detect")
    if pack is not None:  # the pack's recognition model; with --detect also its SCRFD detector
        if detect:
            detector, detector_weights, model, weights = apply_pack_models(pack, detector, detector_weights, model, weights)
        else:
            model, weights = pack_recognition(pack, weights)
    if not detect and not (input_path.is_dir() or input_path.suffix == ".rec"):
        raise click.UsageError(f"{input_path}: expected a folder of crops or a train.rec (raw photos: add --detect)")
    onnx_options = {"preset": onnx_preset, "input_format": input_format, "mean": mean, "std": std}
    if model == "onnx":
        options = {k: v for k, v in onnx_options.items() if v is not None}
    else:
        given = [f"--{k.replace('_', '-')}" for k, v in onnx_options.items() if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to --model onnx")
        options = {"backend": backend, **({"fp16": True} if fp16 else {})}
    if precision != "fp32":  # part of the run's settings: a resumed run never mixes precisions
        options["precision"] = precision
    try:
        spec = EmbedSpec(model=model, weights=str(Path(weights).resolve()) if weights else None, flip=flip,
                         normalize=normalize, dtype=dtype, options=options)
        engine_kwargs = {"options": ray_options} if ray_options is not None else {}
        if detect:
            detect_spec = DetectSpec(
                detector=detector, detector_weights=str(Path(detector_weights).resolve()) if detector_weights else None,
                detector_options=parse_options(detector_options), keep=keep, min_score=min_score, pad_ratio=pad_ratio,
            )
            job = embed_photos_job(input_path, out_dir, spec, detect_spec, device=device, batch_size=batch_size or 8,
                                   shard_size=shard_size, threads=threads, overwrite=overwrite)
        else:
            job = embed_directory_job(input_path, out_dir, spec, device=device, batch_size=batch_size or 64,
                                      shard_size=shard_size, threads=threads, overwrite=overwrite)
        with job:
            summary = run_job(job, engine=engine, workers=0, progress=progress, **engine_kwargs)
    except RunInterrupted as exc:  # one line, no traceback; committed shards stay
        click.echo(str(exc), err=True)
        click.get_current_context().exit(exc.exit_code)
    except (EmbeddingStoreError, CheckpointError, FileNotFoundError, ValueError, RayEngineError, SourceError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary.format())
