"""``facepipe eval quality``: error-versus-reject curves of face quality measures on a verification protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import numpy as np

from facepipe.commands.common import (
    detector_option,
    min_score_option,
    detector_weights_option,
    device_option,
    model_option,
    resolve_device,
    set_threads,
    threads_option,
    weights_option,
)


@click.command("quality")
@click.option("--cfp", "cfp_root", type=click.Path(file_okay=False, exists=True), default=None,
              help="CFP data set folder (Protocol/ and Data/).")
@click.option("--protocol", type=click.Choice(["FF", "FP"]), default="FP", show_default=True, help="CFP protocol.")
@click.option("--lfw", "lfw_root", type=click.Path(file_okay=False, exists=True), default=None, help="LFW image folder.")
@click.option("--lfw-pairs", type=click.Path(dir_okay=False, exists=True), default=None, help="LFW pairs.txt.")
@click.option("--ijbc", "ijbc_root", type=click.Path(file_okay=False, exists=True), default=None,
              help="An IJB-C / IJB-B layout (e.g. the mini IJB-C): its 1:1 template pairs; a template's quality is the "
              "mean of its images' (sharpness is not measured there).")
@click.option("--target", type=click.Choice(["IJBC", "IJBB"]), default="IJBC", show_default=True, help="With --ijbc.")
@click.option("--bin", "bin_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="An insightface .bin (lfw, cfp_fp, agedb_30): its crops re-aligned as compare-detectors does.")
@detector_option
@detector_weights_option
@model_option
@weights_option
@device_option
@threads_option
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--pad", type=click.FloatRange(0, 2), default=0.25, show_default=True,
              help="Black border before detection (fraction of the longer side), as in eval cfp/lfw.")
@min_score_option
@click.option("--fmr", type=click.FloatRange(1e-6, 0.5), default=1e-3, show_default=True,
              help="Operating point: the threshold is set at this false match rate on all pairs.")
@click.option("--max-reject", type=click.FloatRange(0.01, 0.95), default=0.5, show_default=True,
              help="Largest fraction of faces rejected.")
@click.option("--splits", default=None, help="Comma-separated official folds to use; default all.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many pairs per fold.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Feature cache (as eval cfp/lfw).")
@click.option("--no-cache", is_flag=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for evrc.json and evrc.png.")
def quality(cfp_root, protocol, lfw_root, lfw_pairs, ijbc_root, target, bin_file, detector, detector_weights, model, weights, device, threads,
            batch_size, pad, min_score, fmr, max_reject, splits, limit, cache_dir, no_cache, out_dir) -> None:
    """Error-versus-reject curves (ISO/IEC 29794-1) of every quality measure, the oracle and random rejection."""
    from facepipe.evaluation.protocols import ProtocolError, read_cfp_pairs, read_lfw_pairs
    from facepipe.commands.eval_verification import _parse_int_list
    from facepipe.evaluation.quality import error_versus_reject

    if sum(x is not None for x in (cfp_root, lfw_root, bin_file, ijbc_root)) != 1:
        raise click.UsageError("give one protocol: --cfp ROOT, --lfw ROOT --lfw-pairs pairs.txt, --bin FILE or --ijbc ROOT")
    if lfw_root is not None and lfw_pairs is None:
        raise click.UsageError("--lfw needs --lfw-pairs")
    set_threads(threads)
    device = resolve_device(device)
    if ijbc_root is not None:
        _ijbc_quality(Path(ijbc_root), target, model, weights, device, batch_size, cache_dir, fmr, max_reject, out_dir)
        return
    if bin_file is not None:
        name = Path(bin_file).stem
        features, crops, pair_faces, issame = _bin_features(bin_file, detector, detector_weights, model, weights, device,
                                                            batch_size, min_score, cache_dir, no_cache, limit)
        keys = features.keys
    else:
        try:
            pairs = read_cfp_pairs(cfp_root, protocol) if cfp_root else read_lfw_pairs(lfw_pairs, lfw_root)
            pairs = pairs.subset(_parse_int_list(splits, "--splits"), limit)
        except ProtocolError as exc:
            raise click.ClickException(str(exc)) from None
        name = f"CFP-{protocol}" if cfp_root else "LFW"
        missing = pairs.missing_paths()
        if missing:
            raise click.ClickException(f"{name}: {len(missing)} image(s) of the protocol are missing, e.g. {missing[0]}")
        keys = [os.path.abspath(p) for p in pairs.unique_paths()]
        features, crops = _features_and_crops(keys, detector, detector_weights, model, weights, device, batch_size,
                                              min_score, pad, cache_dir, no_cache, name)
        position = {key: i for i, key in enumerate(features.keys)}
        pair_faces = np.array(
            [[position[os.path.abspath(a)], position[os.path.abspath(b)]] for a, b in zip(pairs.left, pairs.right)], dtype=np.int64
        )
        issame = pairs.issame
    from facepipe.evaluation.quality import cosine_scores, pair_measures

    embeddings = features.embedding + features.embedding_flip
    measures = pair_measures(embeddings, features.faces, crops)
    scores = cosine_scores(embeddings, pair_faces)
    try:
        report = error_versus_reject(measures, pair_faces, scores, issame, fmr=fmr, max_reject=max_reject)
    except ValueError as exc:
        raise click.ClickException(f"{name}: {exc}") from None
    _write_report(report, out_dir, {"protocol": name, "detector": detector, "model": model, "faces": len(keys),
                                    "pairs": len(pair_faces)}, f"{name} · detector {detector} · model {model}", fmr, max_reject)


def _write_report(report: Any, out_dir: Path, header: dict[str, Any], title: str, fmr: float, max_reject: float) -> None:
    from facepipe.evaluation.quality import plot_error_versus_reject
    from facepipe.io.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "evrc.json", json.dumps({**header, **report.to_dict()}, indent=1))
    plot_error_versus_reject(report, str(out_dir / "evrc.png"), title=f"Error versus reject: {title}")
    click.echo(f"== {title}: threshold {report.threshold:.4f} at FMR {fmr:g}, FNMR {report.baseline_fnmr:.4f} with nothing rejected")
    click.echo("measure          area (mean FNMR, 0..{:.0%} rejected)".format(max_reject))
    for measure, area in report.ranking():
        click.echo(f"  {measure:<16} {area:.4f}")
    click.echo(f"written: {out_dir / 'evrc.json'}, {out_dir / 'evrc.png'}")


def _ijbc_quality(root: Path, target: str, model: str, weights: str | None, device: str, batch_size: int,
                  cache_dir: str | None, fmr: float, max_reject: float, out_dir: Path) -> None:
    """Template-level curves on an IJB layout: the images' features from the IJB-C feature cache (given five
    points, as `eval ijbc`), templates pooled N1D1F1, per-template quality = the mean of its images'."""
    from facepipe.commands.eval_ijbc import run_feature_job
    from facepipe.evaluation.ijbc import ScoreConfig, TemplatePooling, pool_templates, score_pairs
    from facepipe.evaluation.ijbc_features import FeatureCache, FeatureCacheError, FeatureExtractor, IJBFeatureJob, cache_folder
    from facepipe.evaluation.ijbc_layout import read_ijb_layout
    from facepipe.evaluation.quality import error_versus_reject, template_measures
    from facepipe.quality import face_measures

    try:
        layout = read_ijb_layout(root, target)
        extractor = FeatureExtractor(model=model, weights=weights, device=device)
        key = extractor.cache_key(layout)
        cache_root = Path(cache_dir) if cache_dir else out_dir / "feature_cache"
        cache = FeatureCache(cache_folder(cache_root, target, model, "given", key), key, layout.num_images)
        run_feature_job(IJBFeatureJob(layout, cache, extractor, batch_size), "local")
        pooling = TemplatePooling.build(layout.templates, layout.medias)
        config = ScoreConfig()
        norms = np.empty(layout.num_images)  # flip-summed embedding norms, filled while the shards stream by

        def shards():
            for start, features, faceness, _ in cache.iter_shards():
                norms[start : start + len(features)] = np.linalg.norm(features.sum(axis=1), axis=1)
                yield start, features, faceness

        feats = pool_templates(pooling, shards(), [config])[config]
        rows1, rows2 = pooling.template_rows(layout.pair_t1), pooling.template_rows(layout.pair_t2)
        scores = score_pairs(feats, rows1, rows2)
        image_measures = face_measures(layout.faceness, norms[:, None], layout.landmarks)  # norm of a norm: itself
        measures = template_measures(image_measures, pooling.template_index, pooling.num_templates)
        report = error_versus_reject(measures, np.stack([rows1, rows2], axis=1), scores, layout.labels.astype(bool),
                                     fmr=fmr, max_reject=max_reject)
    except (ValueError, FileNotFoundError, FeatureCacheError) as exc:
        raise click.ClickException(str(exc)) from None
    header = {"protocol": f"{target} 1:1 (templates)", "detector": "given", "model": model,
              "templates": int(pooling.num_templates), "pairs": int(len(scores))}
    _write_report(report, out_dir, header, f"{target} templates · given points · model {model}", fmr, max_reject)


def _features_and_crops(keys, detector, detector_weights, model, weights, device, batch_size, min_score, pad,
                        cache_dir, no_cache, name) -> tuple[Any, np.ndarray]:
    """The verification pipeline's cached features, plus each face's aligned crop (re-warped from the chosen
    face's landmarks; a centre crop where none was found) for the sharpness measure."""
    from facepipe.alignment.similarity import align_faces
    from facepipe.commands.eval_verification import _build_detector, _build_embedder, _cache_dir, _spec
    from facepipe.evaluation.raw_pipeline import center_crop_fallback, extract_features
    from facepipe.io.images import ImageDecodeError, read_image
    from facepipe.types import Face

    def load(key: str) -> np.ndarray:
        try:
            return read_image(key)
        except ImageDecodeError as exc:
            raise click.ClickException(f"{key}: {exc}") from None

    spec = _spec(detector, detector_weights, model, weights, min_score, pad)
    features = extract_features(
        keys, load, _build_detector(detector, detector_weights, device), _build_embedder(model, weights, device, batch_size),
        spec, cache_dir=_cache_dir(cache_dir, no_cache), batch_size=batch_size, description=f"{name} {detector}",
    )
    crops = np.empty((len(keys), 112, 112, 3), dtype=np.uint8)
    for i, (key, row) in enumerate(zip(features.keys, features.faces)):
        image = load(key)
        if np.isnan(row).any():
            crops[i] = center_crop_fallback(image)
        else:
            crops[i] = align_faces([image], [[Face.from_row(row)]])[0][0]
    return features, crops


def _bin_features(bin_file, detector, detector_weights, model, weights, device, batch_size, min_score, cache_dir, no_cache,
                  limit) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """A .bin's crops re-aligned (padded by half, detected, aligned; the crop itself where no face is found), as
    ``compare-detectors`` does, with pairs (2i, 2i+1); sharpness is measured on the given crops."""
    from facepipe.commands.eval_verification import _build_detector, _build_embedder, _cache_dir, _spec
    from facepipe.evaluation.raw_pipeline import extract_features
    from facepipe.io.digest import file_fingerprint
    from facepipe.io.verification_bin import VerificationBinError, load_bin

    try:
        images, issame = load_bin(bin_file, limit_pairs=None if limit is None else 10 * limit)
    except VerificationBinError as exc:
        raise click.ClickException(str(exc)) from None
    resolved = str(Path(bin_file).resolve())
    stamp = file_fingerprint(resolved)
    keys = [f"{resolved}#{i}" for i in range(len(images))]
    features = extract_features(
        keys, lambda key: images[int(key.rsplit("#", 1)[1])], _build_detector(detector, detector_weights, device),
        _build_embedder(model, weights, device, batch_size), _spec(detector, detector_weights, model, weights, min_score,
                                                                   pad=0.5, mode="aligned"),
        cache_dir=_cache_dir(cache_dir, no_cache), batch_size=batch_size, description=f"{Path(bin_file).stem} {detector}",
        stamp=lambda key: stamp,
    )
    pair_faces = np.arange(len(images), dtype=np.int64).reshape(-1, 2)
    return features, images, pair_faces, issame
