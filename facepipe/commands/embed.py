"""``facepipe embed``: aligned crops -> sharded .npy embeddings + parquet manifest (resumable)."""

from __future__ import annotations

from pathlib import Path

import click

from facepipe.commands.common import (
    device_option,
    model_option,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
)
from facepipe.engine.cli_options import engine_option, engine_options, num_gpus_option, ray_address_option


@click.command()
@click.argument("aligned_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Embedding folder: shards/emb-NNNNNN.npy, manifest.parquet, run.json.")
@model_option
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights: backbone.pth / model.pt for iresnet*, a .onnx file for --model onnx.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Add the embedding of the mirrored crop.")
@click.option("--normalize/--raw", "normalize", default=True, show_default=True,
              help="Store L2-normalised vectors (the raw norm is kept in the manifest either way) or raw ones.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Rows per .npy shard (the unit of resume).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="Runtime for mobilefacenet / iresnet*: auto = onnxruntime on CPU (our weights exported once and "
                   "cached; faster and robust to CPU contention), torch on CUDA.")
@click.option("--fp16", is_flag=True, help="fp16 autocast (CUDA, torch models).")
@click.option("--onnx-preset", type=click.Choice(["insightface", "faceplugin"]), default=None,
              help="Input convention of a known ONNX family (default: read from the graph, insightface rule).")
@click.option("--input-format", type=click.Choice(["RGB", "BGR"]), default=None, help="ONNX: override colour order.")
@click.option("--mean", type=float, default=None, help="ONNX: override input mean (pixel units).")
@click.option("--std", type=float, default=None, help="ONNX: override input std (pixel units).")
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
    aligned_dir: Path, out_dir: Path, model: str, weights: str | None, flip: bool, normalize: bool, dtype: str,
    batch_size: int, shard_size: int, backend: str, fp16: bool, onnx_preset: str | None, input_format: str | None,
    mean: float | None, std: float | None, device: str, threads: int | None, overwrite: bool, progress: bool,
    engine: str = "local", ray_address: str | None = None, num_gpus: float | None = None, actors: int | None = None,
    precision: str = "fp32",
) -> None:
    """Embed every aligned crop under ALIGNED_DIR (e.g. the output of `facepipe align`).

    Identity = the crop's folder name; detector scores are carried from ALIGNED_DIR/manifest.parquet when
    present. Rerunning with the same options resumes: finished shards are skipped.
    """
    from facepipe.embedding.store import EmbeddingStoreError, EmbedSpec, embed_directory
    from facepipe.engine.ray_engine import RayEngineError
    from facepipe.models.checkpoint import CheckpointError

    ray_options = engine_options(engine, ray_address, num_gpus, actors=actors)
    if ray_options is None:
        if actors is not None:
            raise click.UsageError("--actors only applies to --engine ray")
        device = resolve_device(device)  # on Ray, actors get GPUs through --num-gpus, not the driver's device
    set_threads(threads)
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
        if ray_options is not None:
            from facepipe.engine.ray_engine import embed_directory_ray

            summary = embed_directory_ray(aligned_dir, out_dir, spec, ray_options, batch_size=batch_size,
                                          shard_size=shard_size, overwrite=overwrite, progress=progress)
        else:
            summary = embed_directory(aligned_dir, out_dir, spec, device=device, batch_size=batch_size,
                                      shard_size=shard_size, threads=threads, overwrite=overwrite, progress=progress)
    except (EmbeddingStoreError, CheckpointError, FileNotFoundError, ValueError, RayEngineError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary.format())
