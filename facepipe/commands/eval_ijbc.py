"""``facepipe eval ijbc``: IJB-C / IJB-B 1:1 verification (TAR@FAR, insightface ijb_11) and 1:N identification (CMC, TPIR@FPIR)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from facepipe.commands.common import (
    apply_pack_models,
    device_option,
    model_option,
    pack_option,
    pack_recognition,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
    weights_option,
)
from facepipe.detection.base import DETECTOR_NAMES
from facepipe.engine.cli_options import engine_option, engine_options, num_gpus_option, ray_address_option
from facepipe.engine.local import run_job
from facepipe.engine.ray_engine import RayEngineError

DETECTOR_CHOICES = ("given",) + DETECTOR_NAMES


@click.command("ijbc")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["IJBC", "IJBB"]), default="IJBC", show_default=True, help="Which meta files to read (<root>/meta/<target>_*.txt).")
@click.option(
    "--protocol", type=click.Choice(["11", "1n"]), default="11", show_default=True,
    help="11: 1:1 verification (TAR@FAR); 1n: 1:N identification (CMC rank 1/5/10/20, TPIR at FPIR 0.01/0.1, per "
    "gallery and averaged) from the <target>_1N_{gallery_*,probe_mixed}.csv files.",
)
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for tar_far.json, table.md, roc.png (accumulated over calls: results.json) and scores/*.npy.")
@model_option
@weights_option
@pack_option
@click.option(
    "--detector", "detectors", type=click.Choice(DETECTOR_CHOICES), multiple=True, default=("given",), show_default=True,
    help="'given' aligns from the data set's five points; a detector re-detects each loose crop and uses its score as "
    "the detector score (no matching face: given points, counted). Repeat to compare in one table and plot.",
)
@click.option("--detector-weights", type=click.Path(exists=True, dir_okay=False), default=None, help="Detector weights file.")
@click.option(
    "--detector-pad", type=click.FloatRange(0.0, 2.0), default=0.2, show_default=True,
    help="Black border around each loose crop before re-detection, as a fraction of its longer side (faces filling the crop need it).",
)
@click.option("--flip/--no-flip", default=True, show_default=True, help="F: add the mirror's embedding.")
@click.option("--norm-score/--no-norm-score", default=True, show_default=True, help="N: keep raw image norms as quality (no per-image L2).")
@click.option("--detector-score/--no-detector-score", default=True, show_default=True, help="D: multiply image features by the face score.")
@click.option("--configs", default=None, help="Several switch combinations at once, e.g. 'N1D1F1,N0D0F1' or 'all'; overrides the three flags.")
@click.option("--name", default=None, help="Method name in the table (default: the model name).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--shard-size", type=int, default=4096, show_default=True, help="Images per cache shard (unit of resumption).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Feature cache root (default: <output>/feature_cache).")
@engine_option
@ray_address_option
@num_gpus_option
@device_option
@threads_option
@precision_option
def ijbc(
    root: Path, target: str, protocol: str, output_dir: Path, model: str, weights: str | None, detectors: tuple[str, ...], detector_weights: str | None,
    detector_pad: float,
    flip: bool, norm_score: bool, detector_score: bool, configs: str | None, name: str | None, batch_size: int, shard_size: int,
    cache_dir: Path | None, engine: str, device: str, threads: int | None,
    ray_address: str | None = None, num_gpus: float | None = None, precision: str = "fp32", pack: Path | None = None,
) -> None:
    """IJB-C / IJB-B 1:1 verification (or, with --protocol 1n, 1:N identification) of ROOT (holding loose_crop/
    and meta/).

    Features ([orig, flip] per image) are cached by content (meta files, weights), so re-running with other
    switches or --configs takes seconds. Results accumulate in OUTPUT: each method's rows are added to
    table.md, roc.png and tar_far.json; a rerun of a method replaces its own rows.

    With --pack, the pack's recognition graph is the model and its SCRFD graph the weights of --detector scrfd.
    """
    from facepipe.evaluation.ijbc import ScoreConfig, TemplatePooling, evaluate_cache, parse_configs, write_report
    from facepipe.evaluation.ijbc_1n import evaluate_cache_1n, read_1n_protocol, write_identification_report
    from facepipe.evaluation.ijbc_features import FeatureCache, FeatureCacheError, FeatureExtractor, IJBFeatureJob, cache_folder
    from facepipe.evaluation.ijbc_layout import read_ijb_layout

    scrfd_weights = detector_weights
    if pack is not None and "scrfd" in detectors:
        _, scrfd_weights, model, weights = apply_pack_models(pack, "scrfd", detector_weights, model, weights)
    elif pack is not None:
        model, weights = pack_recognition(pack, weights)
    set_threads(threads)
    ray_options = engine_options(engine, ray_address, num_gpus)
    if ray_options is None:
        device = resolve_device(device)  # on Ray, actors get GPUs through --num-gpus
    if batch_size < 1 or shard_size < 1:
        raise click.UsageError("--batch-size and --shard-size must be positive")
    try:
        score_configs = parse_configs(configs) if configs else [ScoreConfig(norm_score, detector_score, flip)]
        layout = read_ijb_layout(root, target)
        galleries, probes = read_1n_protocol(root, target, layout) if protocol == "1n" else ([], None)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{target}: {layout.num_images} images, {len(layout.labels)} pairs ({int(layout.labels.sum())} genuine)", err=True)
    cache_root = cache_dir or output_dir / "feature_cache"
    pooling = TemplatePooling.build(layout.templates, layout.medias)
    results, identified = [], []
    for detector in dict.fromkeys(detectors):
        extractor = FeatureExtractor(
            model=model, weights=weights, detector=None if detector == "given" else detector,
            detector_weights={"given": None, "scrfd": scrfd_weights}.get(detector, detector_weights), device=device, detector_pad=detector_pad,
            precision=precision,
        )
        key = extractor.cache_key(layout)
        directory = cache_folder(cache_root, target, model, detector, key)
        try:
            cache = FeatureCache(directory, key, layout.num_images, shard_size)
            job = IJBFeatureJob(layout, cache, extractor, batch_size)
            run_feature_job(job, engine, ray_options)
        except (FeatureCacheError, RayEngineError, ValueError, FileNotFoundError) as error:  # bad cache, weights, cluster
            raise click.ClickException(str(error)) from None
        click.echo(f"{detector}: features of {job.reused} images reused from the cache, {job.extracted} extracted ({directory})", err=True)
        _echo_flag_counts(detector, cache.flags())
        method = (name or model) + ("" if detector == "given" else f"+{detector}")
        if protocol == "1n":
            identified += evaluate_cache_1n(layout, cache, score_configs, method, galleries, probes, pooling)
        else:
            results += evaluate_cache(layout, cache, score_configs, method, scores_dir=output_dir / "scores", pooling=pooling)
    try:  # the results already in OUTPUT must be readable and of the same target
        if protocol == "1n":
            paths = write_identification_report(identified, output_dir)
        else:
            paths = write_report(results, output_dir, title=f"ROC on {target}")
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(paths["table"].read_text(), nl=False)
    written = ", ".join(str(p) for p in paths.values())
    click.echo(f"wrote {written}" + ("" if protocol == "1n" else f", scores in {output_dir / 'scores'}"), err=True)


def _echo_flag_counts(detector: str, flags: Any) -> None:
    """Say how many images did not get the feature the protocol assumes (never silent)."""
    from facepipe.evaluation.ijbc_features import FLAG_DETECTOR_FALLBACK, FLAG_FAILED, FLAG_UNREADABLE

    for flag, what in (
        (FLAG_DETECTOR_FALLBACK, "had no matching detection and used the given points"),
        (FLAG_UNREADABLE, "were unreadable and got zero features"),
        (FLAG_FAILED, "failed in the engine and got zero features"),
    ):
        count = int((flags == flag).sum())
        if count:
            click.echo(f"{detector}: {count} images {what}", err=True)


def run_feature_job(job: Any, engine: str, ray_options: Any = None, progress: bool = True) -> Any:
    """Fill the job's cache on the chosen engine (the one place the IJB-C features meet an engine)."""
    return run_job(job, engine=engine, progress=progress, **({"options": ray_options} if engine == "ray" else {}))
