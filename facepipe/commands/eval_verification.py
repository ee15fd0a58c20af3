"""``facepipe eval verify | cfp | lfw | compare-detectors``: 1:1 verification benchmarks.

* ``verify``: insightface .bin files (already aligned 112x112 crops): embed, 10-fold accuracy, VAL@FAR.
* ``cfp`` / ``lfw``: raw images through detect -> align -> embed (``facepipe.evaluation.raw_pipeline``).
* ``compare-detectors``: the RetinaFace paper's Table 4: the same embedder behind each detector's alignment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from facepipe.commands.common import (
    detector_option,
    detector_weights_option,
    device_option,
    model_option,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
)
from facepipe.detection.base import DETECTOR_NAMES
from facepipe.io.atomic import atomic_write_text

DETECTOR_TITLES = {
    "mtcnn": "MTCNN",
    "retinaface": "RetinaFace",
    "retinaface-r50": "RetinaFace-R50",
    "retinaface-onnx": "RetinaFace (ONNX)",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FACEPIPE_CACHE", Path.home() / ".cache" / "facepipe")) / "verification"


weights_option = click.option(
    "--weights", type=click.Path(dir_okay=False, exists=True), default=None,
    help="Embedding model weights (default: bundled weights where available).",
)
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
    help="Images per detector / embedder batch (raise it on a GPU).",
)
out_option = click.option(
    "--out", type=click.Path(dir_okay=False), required=True, help="Report file (JSON).",
)
roc_option = click.option("--roc", type=click.Path(dir_okay=False), default=None, help="Also draw the ROC to this PNG.")
limit_option = click.option(
    "--limit", type=click.IntRange(min=1), default=None,
    help="Use at most this many pairs per fold (the first ones, half same, half different).",
)
cache_options = [
    click.option(
        "--cache-dir", type=click.Path(file_okay=False), default=None,
        help="Feature cache folder (default $FACEPIPE_CACHE/verification or ~/.cache/facepipe/verification).",
    ),
    click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache."),
]
pad_option = click.option(
    "--pad", type=click.FloatRange(0, 2), default=0.25, show_default=True,
    help="Black border added before detection, as a fraction of the longer image side. Faces that fill the frame "
         "are located better (CFP split 1, RetinaFace: FF 99.29 -> 99.57 %); MTCNN needs it (FF 83.3 -> 99.3 %).",
)
min_score_option = click.option(
    "--min-score", type=click.FloatRange(0, 1), default=0.5, show_default=True,
    help="Detections below this score are ignored when choosing the face.",
)


def _apply(options: Sequence) -> Any:
    def decorator(function: Any) -> Any:
        for option in reversed(options):
            function = option(function)
        return function

    return decorator


def _parse_int_list(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, e.g. 1,2,3") from None
    if not numbers:
        raise click.BadParameter(f"{what} is empty")
    return numbers


def _cache_dir(cache_dir: str | None, no_cache: bool) -> Path | None:
    if no_cache:
        return None
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _build_embedder(model: str, weights: str | None, device: str, batch_size: int, precision: str = "fp32") -> Any:
    from facepipe.embedding.base import create_embedder

    options = {"precision": precision} if precision != "fp32" else {}
    try:
        return create_embedder(model, weights=weights, device=device, batch_size=batch_size, **options)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _build_detector(name: str, weights: str | None, device: str, precision: str = "fp32") -> Any:
    from facepipe.commands.detect import detector_options
    from facepipe.detection.base import create_detector

    options = {k: v for k, v in detector_options(name, 1, precision=precision).items() if k == "precision"}
    try:
        return create_detector(name, weights=weights, device=device, **options)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _meta(model: str, weights: str | None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "weights": weights or "bundled", **extra}


# --------------------------------------------------------------------------------------------------- .bin files


def embed_aligned(embedder: Any, images: np.ndarray, batch_size: int, description: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of aligned crops and of their mirrors, batched, with a progress bar."""
    from tqdm import tqdm

    dim = embedder.embedding_size
    plain = np.empty((len(images), dim), dtype=np.float32)
    mirrored = np.empty((len(images), dim), dtype=np.float32)
    with tqdm(total=len(images), desc=description, unit="img") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            both = embedder.embed(np.concatenate([chunk, chunk[:, :, ::-1]]), flip=False)
            plain[start : start + len(chunk)] = both[: len(chunk)]
            mirrored[start : start + len(chunk)] = both[len(chunk) :]
            bar.update(len(chunk))
    return plain, mirrored


def evaluate_bin(
    path: str | os.PathLike, embedder: Any, batch_size: int = 32, limit_pairs: int | None = None, name: str | None = None
) -> Any:
    """Evaluate one .bin with its own (released) alignment; returns a ``BenchmarkReport``."""
    from facepipe.evaluation.verification import evaluate_interleaved
    from facepipe.io.verification_bin import VerificationBinError, load_bin

    name = name or Path(path).stem
    try:
        images, issame = load_bin(path, limit_pairs=limit_pairs, progress=True)
    except VerificationBinError as exc:
        raise click.ClickException(str(exc)) from None
    if len(issame) < 2:
        raise click.ClickException(f"{path}: {len(issame)} pair(s); the protocol needs at least 2")
    plain, mirrored = embed_aligned(embedder, images, batch_size, f"embed {name}")
    return evaluate_interleaved(name, plain, mirrored, issame, n_folds=min(10, len(issame)))


@click.command()
@click.option("--bin", "bin_files", type=click.Path(dir_okay=False, exists=True), multiple=True, required=True,
              help="insightface verification .bin (lfw.bin, cfp_fp.bin, agedb_30.bin); repeatable.")
@model_option
@weights_option
@device_option
@threads_option
@batch_size_option
@click.option("--limit", type=click.IntRange(min=10), default=None, help="Use only the first N pairs of each file.")
@out_option
@roc_option
@precision_option
def verify(bin_files, model, weights, device, threads, batch_size, limit, out, roc, precision="fp32") -> None:
    """10-fold verification accuracy on insightface .bin files (crops as released, flip test)."""
    from facepipe.evaluation.verification import plot_roc, write_json

    set_threads(threads)
    embedder = _build_embedder(model, weights, resolve_device(device), batch_size, precision)
    reports = []
    for path in bin_files:
        report = evaluate_bin(path, embedder, batch_size, limit)
        for line in report.lines():
            click.echo(line)
        reports.append(report)
    data: dict[str, Any] = {r.name: r.to_dict() for r in reports}
    data["meta"] = _meta(model, weights, bins=[str(p) for p in bin_files], limit=limit,
                         precision=getattr(embedder, "precision", "fp32"))
    write_json(data, out)
    if roc:
        plot_roc(reports, roc, title=f"{model}: verification ROC")
    click.echo(f"report written to {out}")


# --------------------------------------------------------------------------------------------------- raw images


def run_pairs(
    name: str,
    pairs: Any,
    detector: Any,
    embedder: Any,
    spec: Any,
    cache_dir: Path | None,
    batch_size: int,
) -> tuple[Any, dict[str, Any]]:
    """Features for every image of ``pairs`` (cached), then the protocol on the official folds."""
    from facepipe.evaluation.raw_pipeline import extract_features, feature_summary
    from facepipe.evaluation.verification import evaluate_embeddings
    from facepipe.io.images import ImageDecodeError, read_image

    _check_pair_count(name, pairs)
    missing = pairs.missing_paths()
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        raise click.ClickException(f"{name}: {len(missing)} image(s) of the protocol are missing, e.g.\n  {shown}")

    def load(key: str) -> np.ndarray:
        try:
            return read_image(key)
        except ImageDecodeError as exc:
            raise click.ClickException(f"{key}: {exc}") from None

    # Absolute (not symlink-resolved) paths: the cache key must not depend on the working directory.
    keys = [os.path.abspath(p) for p in pairs.unique_paths()]
    features = extract_features(
        keys, load, detector, embedder, spec, cache_dir=cache_dir, batch_size=batch_size,
        description=f"{name} {spec.detector}",
    )
    position = features.index()
    left = np.array([position[os.path.abspath(p)] for p in pairs.left], dtype=np.int64)
    right = np.array([position[os.path.abspath(p)] for p in pairs.right], dtype=np.int64)
    several_folds = len(pairs.folds) >= 2
    report = evaluate_embeddings(
        name,
        features.embedding[left],
        features.embedding_flip[left],
        features.embedding[right],
        features.embedding_flip[right],
        pairs.issame,
        n_folds=min(10, len(pairs)),
        fold_ids=pairs.fold if several_folds else None,
    )
    summary = feature_summary(features)
    summary["folds"] = pairs.folds if several_folds else f"10 ordered folds inside fold {pairs.folds[0]}"
    return report, summary


def _cfp_pair_lists(root: str, protocols: Sequence[str], splits: list[int] | None, limit: int | None) -> dict[str, Any]:
    from facepipe.evaluation.protocols import ProtocolError, read_cfp_pairs

    try:
        lists = {p: read_cfp_pairs(root, p).subset(splits, limit) for p in protocols}
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    for protocol, pairs in lists.items():
        _check_pair_count(f"CFP-{protocol}", pairs)
    return lists


def _check_pair_count(name: str, pairs: Any) -> None:
    if len(pairs) < 2:
        raise click.ClickException(f"{name}: {len(pairs)} pair(s) selected; the protocol needs at least 2")


def _lfw_pair_list(root: str, pairs_file: str, splits: list[int] | None, limit: int | None) -> Any:
    from facepipe.evaluation.protocols import ProtocolError, read_lfw_pairs

    try:
        pairs = read_lfw_pairs(pairs_file, root).subset(splits, limit)
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    _check_pair_count("LFW", pairs)
    return pairs


def _spec(detector: str, detector_weights: str | None, model: str, weights: str | None, min_score: float,
          pad: float, mode: str = "raw", det: Any = None, embedder: Any = None) -> Any:
    """The cache identity; a model run in reduced precision is named ``model@bf16`` so fp32 features stay apart."""
    from facepipe.evaluation.raw_pipeline import PipelineSpec

    detector = _with_precision(detector, getattr(getattr(det, "backend", None), "precision", "fp32"))
    model = _with_precision(model, getattr(embedder, "precision", "fp32"))
    return PipelineSpec(detector, detector_weights, model, weights, min_score=min_score, mode=mode, pad=pad)


def _with_precision(name: str, precision: str) -> str:
    return name if precision == "fp32" else f"{name}@{precision}"


def _entry(report: Any, summary: dict[str, Any]) -> dict[str, Any]:
    return {**report.to_dict(), "images": summary}


def _echo_report(report: Any, summary: dict[str, Any]) -> None:
    for line in report.lines():
        click.echo(line)
    click.echo(f"[{report.name}]images: {summary['images']}, no face found (fallback crop): {summary['fallback']}")


splits_option = click.option(
    "--splits", default=None, help="Comma-separated official folds to use (CFP splits 1-10, LFW sets 1-10); default all.",
)


# The options shared by the raw-image protocols (cfp, lfw): the detect -> align -> embed pipeline and its outputs.
raw_protocol_options = [
    detector_option, detector_weights_option, model_option, weights_option, device_option, threads_option,
    batch_size_option, splits_option, limit_option, min_score_option, pad_option, *cache_options, out_option,
    roc_option, precision_option,
]


@click.command()
@click.option("--root", type=click.Path(file_okay=False, exists=True), required=True,
              help="CFP data set folder (holds Protocol/ and Data/).")
@click.option("--protocol", "protocols", type=click.Choice(["FF", "FP"]), multiple=True, default=("FF", "FP"),
              show_default=True, help="Which protocol(s); repeatable.")
@_apply(raw_protocol_options)
def cfp(root, protocols, detector, detector_weights, model, weights, device, threads, batch_size, splits, limit,
        min_score, pad, cache_dir, no_cache, out, roc, precision="fp32") -> None:
    """CFP-FF / CFP-FP from the raw images: detect, align, embed, 10-fold on the official splits."""
    from facepipe.evaluation.verification import plot_roc, write_json

    set_threads(threads)
    device = resolve_device(device)
    pair_lists = _cfp_pair_lists(root, protocols, _parse_int_list(splits, "--splits"), limit)
    det = _build_detector(detector, detector_weights, device, precision)
    embedder = _build_embedder(model, weights, device, batch_size, precision)
    spec = _spec(detector, detector_weights, model, weights, min_score, pad, det=det, embedder=embedder)
    data: dict[str, Any] = {}
    reports = []
    for protocol, pairs in pair_lists.items():
        report, summary = run_pairs(f"cfp_{protocol.lower()}", pairs, det, embedder, spec,
                                    _cache_dir(cache_dir, no_cache), batch_size)
        _echo_report(report, summary)
        data[protocol] = _entry(report, summary)
        reports.append(report)
    data["meta"] = _meta(model, weights, detector=detector, detector_weights=detector_weights or "bundled",
                         root=str(root), splits=splits or "all", limit=limit, min_score=min_score, pad=pad,
                         precision=spec.model.partition("@")[2] or "fp32")
    write_json(data, out)
    if roc:
        plot_roc(reports, roc, title=f"{DETECTOR_TITLES.get(detector, detector)} + {model}: CFP ROC")
    click.echo(f"report written to {out}")


@click.command()
@click.option("--root", type=click.Path(file_okay=False, exists=True), required=True,
              help="LFW image folder (<root>/<name>/<name>_0001.jpg).")
@click.option("--pairs", "pairs_file", type=click.Path(dir_okay=False, exists=True), required=True,
              help="The protocol file (pairs.txt).")
@_apply(raw_protocol_options)
def lfw(root, pairs_file, detector, detector_weights, model, weights, device, threads, batch_size, splits, limit,
        min_score, pad, cache_dir, no_cache, out, roc, precision="fp32") -> None:
    """LFW from the raw images and pairs.txt: detect, align, embed, 10-fold on the official sets."""
    from facepipe.evaluation.verification import plot_roc, write_json

    set_threads(threads)
    device = resolve_device(device)
    pairs = _lfw_pair_list(root, pairs_file, _parse_int_list(splits, "--splits"), limit)
    det = _build_detector(detector, detector_weights, device, precision)
    embedder = _build_embedder(model, weights, device, batch_size, precision)
    spec = _spec(detector, detector_weights, model, weights, min_score, pad, det=det, embedder=embedder)
    report, summary = run_pairs("lfw", pairs, det, embedder, spec, _cache_dir(cache_dir, no_cache), batch_size)
    _echo_report(report, summary)
    data = {"LFW": _entry(report, summary)}
    data["meta"] = _meta(model, weights, detector=detector, detector_weights=detector_weights or "bundled",
                         root=str(root), pairs=str(pairs_file), splits=splits or "all", limit=limit, min_score=min_score, pad=pad,
                         precision=spec.model.partition("@")[2] or "fp32")
    write_json(data, out)
    if roc:
        plot_roc([report], roc, title=f"{DETECTOR_TITLES.get(detector, detector)} + {model}: LFW ROC")
    click.echo(f"report written to {out}")


# --------------------------------------------------------------------------------------------------- comparison


def realign_bin(
    path: str | os.PathLike, detector: Any, detector_name: str, embedder: Any, spec: Any, cache_dir: Path | None,
    batch_size: int, limit_pairs: int | None,
) -> tuple[Any, dict[str, Any]]:
    """A .bin re-aligned by ``detector``: each crop padded, detected, aligned again (crop kept if no face)."""
    from facepipe.evaluation.raw_pipeline import extract_features, feature_summary
    from facepipe.evaluation.verification import evaluate_interleaved
    from facepipe.io.verification_bin import VerificationBinError, load_bin

    name = Path(path).stem
    try:
        images, issame = load_bin(path, limit_pairs=limit_pairs)
    except VerificationBinError as exc:
        raise click.ClickException(str(exc)) from None
    if len(issame) < 2:
        raise click.ClickException(f"{path}: {len(issame)} pair(s); the protocol needs at least 2")
    resolved = str(Path(path).resolve())
    keys = [f"{resolved}#{i}" for i in range(len(images))]
    features = extract_features(
        keys, lambda key: images[int(key.rsplit("#", 1)[1])], detector, embedder, spec,
        cache_dir=cache_dir, batch_size=batch_size, description=f"{name} {detector_name}",
    )
    report = evaluate_interleaved(name, features.embedding, features.embedding_flip, issame, n_folds=min(10, len(issame)))
    return report, feature_summary(features)


def format_table(rows: list[dict[str, Any]], columns: list[str], model: str) -> str:
    """Markdown: one row per method, accuracy (%) +- std per benchmark column, then fallback counts."""
    lines = [
        f"| Method | {' | '.join(columns)} |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = []
        for column in columns:
            result = row["results"].get(column)
            cells.append("-" if result is None else f"{100 * result['acc']:.2f} ± {100 * result['std']:.2f}")
        lines.append(f"| {row['method']} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Accuracy (%) of the 10-fold protocol with the flip test, embedder `{model}`.")
    notes = []
    for row in rows:
        for column in columns:
            result = row["results"].get(column)
            if result is not None and result.get("images", {}).get("fallback"):
                images = result["images"]
                notes.append(f"{row['method']} / {column}: no face found in {images['fallback']} of {images['images']} images")
    if notes:
        lines.append("Fallback crops (no face above the score threshold): " + "; ".join(notes) + ".")
    return "\n".join(lines) + "\n"


def _out_paths(out: str) -> tuple[Path, Path]:
    out_path = Path(out)
    if out_path.suffix.lower() == ".json":
        return out_path.with_suffix(".md"), out_path
    return out_path, out_path.with_suffix(".json")


@click.command(name="compare-detectors")
@click.option("--cfp", "cfp_root", type=click.Path(file_okay=False, exists=True), default=None,
              help="CFP data set folder: adds CFP-FF and CFP-FP columns.")
@click.option("--lfw", "lfw_root", type=click.Path(file_okay=False, exists=True), default=None,
              help="LFW image folder: adds an LFW column (needs --lfw-pairs).")
@click.option("--lfw-pairs", type=click.Path(dir_okay=False, exists=True), default=None, help="LFW pairs.txt.")
@click.option("--bin", "bin_files", type=click.Path(dir_okay=False, exists=True), multiple=True,
              help="Verification .bin: its crops are re-aligned by each detector (padded, detected, aligned); "
                   "a row with the crops as released is added. Repeatable.")
@click.option("--detectors", default="mtcnn,retinaface", show_default=True,
              help=f"Comma-separated detectors, one row each ({', '.join(DETECTOR_NAMES)}).")
@model_option
@weights_option
@device_option
@threads_option
@batch_size_option
@splits_option
@limit_option
@min_score_option
@pad_option
@_apply(cache_options)
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="table.md or table.json: both the Markdown and the JSON table are written.")
def compare_detectors(cfp_root, lfw_root, lfw_pairs, bin_files, detectors, model, weights, device, threads,
                      batch_size, splits, limit, min_score, pad, cache_dir, no_cache, out) -> None:
    """Same embedder, different face detectors for alignment (RetinaFace paper, Table 4)."""
    from facepipe.evaluation.verification import write_json

    if not (cfp_root or lfw_root or bin_files):
        raise click.UsageError("give at least one benchmark: --cfp, --lfw with --lfw-pairs, or --bin")
    if bool(lfw_root) != bool(lfw_pairs):
        raise click.UsageError("--lfw and --lfw-pairs go together")
    detector_names = [d for d in detectors.replace(" ", "").split(",") if d]
    unknown = [d for d in detector_names if d not in DETECTOR_NAMES]
    if unknown or not detector_names:
        raise click.BadParameter(f"unknown detector(s) {unknown}; choose from {', '.join(DETECTOR_NAMES)}",
                                 param_hint="--detectors")
    set_threads(threads)
    device = resolve_device(device)
    split_list = _parse_int_list(splits, "--splits")
    cache = _cache_dir(cache_dir, no_cache)
    cfp_lists = _cfp_pair_lists(cfp_root, ("FF", "FP"), split_list, limit) if cfp_root else {}
    lfw_list = _lfw_pair_list(lfw_root, lfw_pairs, split_list, limit) if lfw_root else None
    bin_limit = None if limit is None else limit * 10
    embedder = _build_embedder(model, weights, device, batch_size)

    columns = [f"CFP-{p}" for p in cfp_lists] + (["LFW"] if lfw_list is not None else [])
    columns += [Path(b).stem for b in bin_files]
    rows: list[dict[str, Any]] = []
    for detector_name in detector_names:
        detector = _build_detector(detector_name, None, device)
        results: dict[str, Any] = {}
        spec = _spec(detector_name, None, model, weights, min_score, pad)
        for protocol, pairs in cfp_lists.items():
            report, summary = run_pairs(f"cfp_{protocol.lower()}", pairs, detector, embedder, spec, cache, batch_size)
            _echo_report(report, summary)
            results[f"CFP-{protocol}"] = _entry(report, summary)
        if lfw_list is not None:
            report, summary = run_pairs("lfw", lfw_list, detector, embedder, spec, cache, batch_size)
            _echo_report(report, summary)
            results["LFW"] = _entry(report, summary)
        aligned_spec = _spec(detector_name, None, model, weights, min_score, pad=0.5, mode="aligned")
        for path in bin_files:
            report, summary = realign_bin(path, detector, detector_name, embedder, aligned_spec, cache, batch_size,
                                          bin_limit)
            _echo_report(report, summary)
            results[Path(path).stem] = _entry(report, summary)
        rows.append({"method": f"{DETECTOR_TITLES.get(detector_name, detector_name)} + {model}",
                     "detector": detector_name, "results": results})
    if bin_files:
        results = {}
        for path in bin_files:
            report = evaluate_bin(path, embedder, batch_size, bin_limit)
            for line in report.lines():
                click.echo(line)
            results[Path(path).stem] = report.to_dict()
        rows.append({"method": f"released .bin crops + {model}", "detector": None, "results": results})

    markdown_path, json_path = _out_paths(out)
    table = format_table(rows, columns, model)
    atomic_write_text(markdown_path, table)
    write_json({"columns": columns, "rows": rows,
                "meta": _meta(model, weights, cfp=cfp_root, lfw=lfw_root, lfw_pairs=lfw_pairs,
                              bins=list(bin_files), splits=splits or "all", limit=limit, min_score=min_score, pad=pad)},
               json_path)
    click.echo(table)
    click.echo(f"table written to {markdown_path} and {json_path}")
