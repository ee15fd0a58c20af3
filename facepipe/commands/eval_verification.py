"""``facepipe eval verify | cfp | lfw | compare-detectors``: 1:1 verification benchmarks.

* ``verify``: insightface .bin files (already aligned 112x112 crops): embed, 10-fold accuracy, VAL@FAR.
* ``cfp`` / ``lfw``: raw images through detect -> align -> embed (``facepipe.evaluation.raw_pipeline``).
* ``compare-detectors``: the RetinaFace paper's Table 4: the same embedder behind each detector's alignment;
  the table accumulates over calls (one row per detector and model; a rerun replaces its row).

The runs themselves live in ``facepipe.evaluation.verification_runs``; this module parses options, prints each
result block under a title naming its benchmark, detector and model, and turns library errors into one line
(``_clear_errors``, the one boundary).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import click

from facepipe.commands.common import (
    apply_pack_models,
    check_detector_precision,
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
from facepipe.detection.base import DETECTOR_NAMES
from facepipe.evaluation.verification_runs import DETECTOR_TITLES, VerificationRunError, block_title, summary_line


def default_cache_dir() -> Path:
    from facepipe.models.checkpoint import cache_dir

    return cache_dir() / "verification"


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
        help="Feature cache folder (default $FACEPIPE_HOME/verification or ~/.cache/facepipe/verification).",
    ),
    click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache."),
]
pad_option = click.option(
    "--pad", type=click.FloatRange(0, 2), default=0.25, show_default=True,
    help="Black border added before detection, as a fraction of the longer image side. Faces that fill the frame "
         "are located better (CFP split 1, RetinaFace: FF 99.29 -> 99.57 %); MTCNN needs it (FF 83.3 -> 99.3 %).",
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
    return create_embedder(model, weights=weights, device=device, batch_size=batch_size, **options)


def _build_detector(name: str, weights: str | None, device: str, precision: str = "fp32") -> Any:
    from facepipe.detection.base import create_detector

    check_detector_precision(precision, name, device)
    options = {"precision": precision} if precision != "fp32" else {}
    return create_detector(name, weights=weights, device=device, **options)


def _meta(model: str, weights: str | None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "weights": weights or "bundled", **extra}


@contextmanager
def _clear_errors() -> Iterator[None]:
    """The one boundary: a library error (bad input, unknown model, missing weights) becomes one line."""
    try:
        yield
    except (VerificationRunError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _echo_block(title: str, report: Any, summary: dict[str, Any] | None = None) -> None:
    click.echo(title)
    for line in report.lines():
        click.echo(line)
    if summary is not None:
        click.echo(summary_line(report, summary))


# --------------------------------------------------------------------------------------------------- .bin files


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
    from facepipe.evaluation.verification_runs import evaluate_bin

    set_threads(threads)
    with _clear_errors():
        embedder = _build_embedder(model, weights, resolve_device(device), batch_size, precision)
        reports = []
        for path in bin_files:
            report = evaluate_bin(path, embedder, batch_size, limit)
            _echo_block(block_title(Path(path).stem, model, None), report)
            reports.append(report)
    data: dict[str, Any] = {r.name: r.to_dict() for r in reports}
    data["meta"] = _meta(model, weights, bins=[str(p) for p in bin_files], limit=limit,
                         precision=getattr(embedder, "precision", "fp32"))
    write_json(data, out)
    if roc:
        plot_roc(reports, roc, title=f"{model}: verification ROC")
    click.echo(f"report written to {out}")


# --------------------------------------------------------------------------------------------------- raw images


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


def _run_protocols(
    pair_lists: dict[str, tuple[str, str, Any]], detector_name: str, detector_weights: str | None, model: str,
    weights: str | None, device: str, batch_size: int, min_score: float, pad: float, cache: Path | None,
    out: str, roc: str | None, roc_title: str, meta: dict[str, Any], precision: str = "fp32",
) -> None:
    """``{report key: (report name, printed title, pairs)}`` through one detector and embedder; the JSON report
    (and ROC)."""
    from facepipe.evaluation.verification import plot_roc, write_json
    from facepipe.evaluation.verification_runs import run_pairs

    with _clear_errors():
        detector = _build_detector(detector_name, detector_weights, device, precision)
        embedder = _build_embedder(model, weights, device, batch_size, precision)
        spec = _spec(detector_name, detector_weights, model, weights, min_score, pad, det=detector, embedder=embedder)
        data: dict[str, Any] = {}
        reports = []
        for key, (name, title, pairs) in pair_lists.items():
            report, summary = run_pairs(name, pairs, detector, embedder, spec, cache, batch_size)
            _echo_block(block_title(title, model, detector_name), report, summary)
            data[key] = _entry(report, summary)
            reports.append(report)
    data["meta"] = _meta(model, weights, detector=detector_name, detector_weights=detector_weights or "bundled",
                         min_score=min_score, pad=pad, precision=spec.model.partition("@")[2] or "fp32", **meta)
    write_json(data, out)
    if roc:
        plot_roc(reports, roc, title=f"{DETECTOR_TITLES.get(detector_name, detector_name)} + {model}: {roc_title} ROC")
    click.echo(f"report written to {out}")


splits_option = click.option(
    "--splits", default=None, help="Comma-separated official folds to use (CFP splits 1-10, LFW sets 1-10); default all.",
)


# The options shared by the raw-image protocols (cfp, lfw): the detect -> align -> embed pipeline and its outputs.
raw_protocol_options = [
    detector_option, detector_weights_option, model_option, weights_option, device_option, threads_option,
    batch_size_option, splits_option, limit_option, min_score_option, pad_option, *cache_options, out_option,
    roc_option, precision_option, pack_option,
]


@click.command()
@click.option("--root", type=click.Path(file_okay=False, exists=True), required=True,
              help="CFP data set folder (holds Protocol/ and Data/).")
@click.option("--protocol", "protocols", type=click.Choice(["FF", "FP"]), multiple=True, default=("FF", "FP"),
              show_default=True, help="Which protocol(s); repeatable.")
@_apply(raw_protocol_options)
def cfp(root, protocols, detector, detector_weights, model, weights, device, threads, batch_size, splits, limit,
        min_score, pad, cache_dir, no_cache, out, roc, precision="fp32", pack=None) -> None:
    """CFP-FF / CFP-FP from the raw images: detect, align, embed, 10-fold on the official splits."""
    from facepipe.evaluation.verification_runs import cfp_pair_lists

    detector, detector_weights, model, weights = apply_pack_models(pack, detector, detector_weights, model, weights)
    set_threads(threads)
    with _clear_errors():
        pair_lists = cfp_pair_lists(root, protocols, _parse_int_list(splits, "--splits"), limit)
    _run_protocols({p: (f"cfp_{p.lower()}", f"CFP-{p}", pairs) for p, pairs in pair_lists.items()}, detector, detector_weights,
                   model, weights, resolve_device(device), batch_size, min_score, pad, _cache_dir(cache_dir, no_cache),
                   out, roc, "CFP", {"root": str(root), "splits": splits or "all", "limit": limit}, precision)


@click.command()
@click.option("--root", type=click.Path(file_okay=False, exists=True), required=True,
              help="LFW image folder (<root>/<name>/<name>_0001.jpg).")
@click.option("--pairs", "pairs_file", type=click.Path(dir_okay=False, exists=True), required=True,
              help="The protocol file (pairs.txt).")
@_apply(raw_protocol_options)
def lfw(root, pairs_file, detector, detector_weights, model, weights, device, threads, batch_size, splits, limit,
        min_score, pad, cache_dir, no_cache, out, roc, precision="fp32", pack=None) -> None:
    """LFW from the raw images and pairs.txt: detect, align, embed, 10-fold on the official sets."""
    from facepipe.evaluation.verification_runs import lfw_pair_list

    detector, detector_weights, model, weights = apply_pack_models(pack, detector, detector_weights, model, weights)
    set_threads(threads)
    with _clear_errors():
        pairs = lfw_pair_list(root, pairs_file, _parse_int_list(splits, "--splits"), limit)
    _run_protocols({"LFW": ("lfw", "LFW", pairs)}, detector, detector_weights, model, weights, resolve_device(device),
                   batch_size, min_score, pad, _cache_dir(cache_dir, no_cache), out, roc, "LFW",
                   {"root": str(root), "pairs": str(pairs_file), "splits": splits or "all", "limit": limit}, precision)


# --------------------------------------------------------------------------------------------------- comparison


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
              help=f"Comma-separated detectors, one row each ({', '.join(DETECTOR_NAMES)}); NAME=FILE gives weights, "
                   "e.g. scrfd=det_10g.onnx.")
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
    """Same embedder, different face detectors for alignment (RetinaFace paper, Table 4).

    The table accumulates in --out: rows of other detectors or models already there are kept, a rerun of a
    detector with the same model and weights replaces its row.
    """
    from facepipe.evaluation.verification_runs import (
        ComparisonTable,
        cfp_pair_lists,
        evaluate_bin,
        lfw_pair_list,
        realign_bin,
        run_pairs,
    )

    if not (cfp_root or lfw_root or bin_files):
        raise click.UsageError("give at least one benchmark: --cfp, --lfw with --lfw-pairs, or --bin")
    if bool(lfw_root) != bool(lfw_pairs):
        raise click.UsageError("--lfw and --lfw-pairs go together")
    weights_of = dict(d.partition("=")[::2] for d in detectors.replace(" ", "").split(",") if d)  # scrfd=FILE.onnx
    detector_names = list(weights_of)
    unknown = [d for d in detector_names if d not in DETECTOR_NAMES]
    if unknown or not detector_names:
        raise click.BadParameter(f"unknown detector(s) {unknown}; choose from {', '.join(DETECTOR_NAMES)}",
                                 param_hint="--detectors")
    set_threads(threads)
    device = resolve_device(device)
    split_list = _parse_int_list(splits, "--splits")
    cache = _cache_dir(cache_dir, no_cache)
    markdown_path, json_path = _out_paths(out)
    bin_limit = None if limit is None else limit * 10
    with _clear_errors():
        stored = ComparisonTable.load(json_path)
        cfp_lists = cfp_pair_lists(cfp_root, ("FF", "FP"), split_list, limit) if cfp_root else {}
        lfw_list = lfw_pair_list(lfw_root, lfw_pairs, split_list, limit) if lfw_root else None
        embedder = _build_embedder(model, weights, device, batch_size)
        columns = [f"CFP-{p}" for p in cfp_lists] + (["LFW"] if lfw_list is not None else [])
        columns += [Path(b).stem for b in bin_files]
        rows: list[dict[str, Any]] = []
        for detector_name in detector_names:
            detector_weights = weights_of[detector_name] or None
            detector = _build_detector(detector_name, detector_weights, device)
            results: dict[str, Any] = {}
            spec = _spec(detector_name, detector_weights, model, weights, min_score, pad)
            raw = [(f"CFP-{p}", f"cfp_{p.lower()}", pairs) for p, pairs in cfp_lists.items()]
            raw += [("LFW", "lfw", lfw_list)] if lfw_list is not None else []
            for column, name, pairs in raw:
                report, summary = run_pairs(name, pairs, detector, embedder, spec, cache, batch_size)
                _echo_block(block_title(column, model, detector_name), report, summary)
                results[column] = _entry(report, summary)
            aligned_spec = _spec(detector_name, detector_weights, model, weights, min_score, pad=0.5, mode="aligned")
            for path in bin_files:
                report, summary = realign_bin(path, detector, detector_name, embedder, aligned_spec, cache, batch_size,
                                              bin_limit)
                _echo_block(block_title(Path(path).stem, model, detector_name), report, summary)
                results[Path(path).stem] = _entry(report, summary)
            rows.append({"key": ComparisonTable.row_key(detector_name, model, weights),
                         "method": f"{DETECTOR_TITLES.get(detector_name, detector_name)} + {model}",
                         "detector": detector_name, "model": model, "weights": weights, "results": results})
        if bin_files:
            results = {}
            for path in bin_files:
                report = evaluate_bin(path, embedder, batch_size, bin_limit)
                _echo_block(block_title(Path(path).stem, model, None), report)
                results[Path(path).stem] = report.to_dict()
            rows.append({"key": ComparisonTable.row_key(None, model, weights), "method": f"released .bin crops + {model}",
                         "detector": None, "model": model, "weights": weights, "results": results})
    stored.add(columns, rows, _meta(model, weights, cfp=cfp_root, lfw=lfw_root, lfw_pairs=lfw_pairs, bins=list(bin_files),
                                    splits=splits or "all", limit=limit, min_score=min_score, pad=pad))
    table = stored.write(markdown_path, json_path)
    click.echo(table)
    click.echo(f"table written to {markdown_path} and {json_path} ({len(stored.rows)} rows)")
