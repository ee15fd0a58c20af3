"""``facepipe eval ijbc``: IJB-C / IJB-B 1:1 verification (TAR@FAR) with the insightface ijb_11 protocol."""

from __future__ import annotations

from pathlib import Path

import click

from facepipe.commands.common import device_option, model_option, resolve_device, set_threads, threads_option, weights_option
from facepipe.detection.base import DETECTOR_NAMES
from facepipe.engine.cli_options import engine_option, engine_options, num_gpus_option, ray_address_option

DETECTOR_CHOICES = ("given",) + DETECTOR_NAMES


@click.command("ijbc")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["IJBC", "IJBB"]), default="IJBC", show_default=True, help="Which meta files to read (<root>/meta/<target>_*.txt).")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for tar_far.json, table.md, roc.png and scores/*.npy.")
@model_option
@weights_option
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
def ijbc(
    root: Path, target: str, output_dir: Path, model: str, weights: str | None, detectors: tuple[str, ...], detector_weights: str | None,
    detector_pad: float,
    flip: bool, norm_score: bool, detector_score: bool, configs: str | None, name: str | None, batch_size: int, shard_size: int,
    cache_dir: Path | None, engine: str, device: str, threads: int | None,
    ray_address: str | None = None, num_gpus: float | None = None,
) -> None:
    """IJB-C / IJB-B 1:1 verification of ROOT (holding loose_crop/ and meta/).

    Features ([orig, flip] per image) are cached, so re-running with other switches or --configs takes seconds.
    """
    from facepipe.evaluation import ijbc as protocol

    set_threads(threads)
    ray_options = engine_options(engine, ray_address, num_gpus)
    if ray_options is None:
        device = resolve_device(device)  # on Ray, actors get GPUs through --num-gpus
    if batch_size < 1 or shard_size < 1:
        raise click.UsageError("--batch-size and --shard-size must be positive")
    try:
        score_configs = protocol.parse_configs(configs) if configs else [protocol.ScoreConfig(norm_score, detector_score, flip)]
        layout = protocol.read_ijb_layout(root, target)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{target}: {layout.num_images} images, {len(layout.labels)} pairs ({int(layout.labels.sum())} genuine)", err=True)
    cache_root = cache_dir or output_dir / "feature_cache"
    pooling = protocol.TemplatePooling.build(layout.templates, layout.medias)
    results = []
    for detector in dict.fromkeys(detectors):
        extractor = protocol.FeatureExtractor(
            model=model, weights=weights, detector=None if detector == "given" else detector,
            detector_weights=None if detector == "given" else detector_weights, device=device, detector_pad=detector_pad,
        )
        key = extractor.cache_key(layout)
        directory = cache_root / f"{target}_{model}_{detector}_{protocol.FeatureCache.key_digest(key)}"
        try:
            cache = protocol.FeatureCache(directory, key, layout.num_images, shard_size)
        except ValueError as error:
            raise click.ClickException(str(error)) from error
        if not cache.complete:
            from facepipe.engine.ray_engine import RayEngineError

            try:
                protocol.extract_features(layout, cache, extractor, batch_size=batch_size, engine=engine, engine_options=ray_options)
            except RayEngineError as error:
                raise click.ClickException(str(error)) from None
        method = (name or model) + ("" if detector == "given" else f"+{detector}")
        results += protocol.evaluate_cache(layout, cache, score_configs, method, scores_dir=output_dir / "scores", pooling=pooling)
    paths = protocol.write_report(results, output_dir, title=f"ROC on {target}")
    for cache_dir_name, result in {r.config["cache"]: r for r in results}.items():
        fallbacks, unreadable = result.config["detector_fallbacks"], result.config["unreadable_images"]
        if fallbacks:
            click.echo(f"{result.config['detector']}: {fallbacks} images had no matching detection and used the given points", err=True)
        if unreadable:
            click.echo(f"{cache_dir_name}: {unreadable} unreadable images got zero features", err=True)
    click.echo(paths["table"].read_text(), nl=False)
    click.echo(f"wrote {paths['json']}, {paths['table']}, {paths['roc']}, scores in {output_dir / 'scores'}", err=True)
