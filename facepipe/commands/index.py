"""``facepipe index build|search``: FAISS galleries over embedding folders."""

from __future__ import annotations

from pathlib import Path

import click

from facepipe.commands.common import (
    check_detector_precision,
    detector_option,
    detector_weights_option,
    device_option,
    min_score_option,
    precision_option,
    resolve_device,
    set_threads,
    threads_option,
)


@click.group()
def index() -> None:
    """Build and search FAISS galleries (inner product on L2-normalised embeddings)."""


@index.command()
@click.argument("emb_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Index file, e.g. gallery.faiss (mapping .parquet and settings .json are written beside it).")
@click.option("--type", "index_type", type=click.Choice(["flat", "hnsw", "ivfpq", "ivfflat"]), default="flat", show_default=True,
              help="flat = exact (right up to a few million faces); others are approximate and report recall@k.")
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="IVF cells [default ~4 sqrt(N)].")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF cells visited per query [default nlist/8].")
@click.option("--pq-m", type=click.IntRange(min=1), default=None, help="PQ sub-quantisers (divides the dimension).")
@click.option("--hnsw-m", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--ef-search", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--recall-queries", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Gallery vectors used as queries to measure recall against exact search.")
@click.option("--k", "recall_k", type=click.IntRange(min=1), default=10, show_default=True)
@threads_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def build(
    emb_dirs: tuple[Path, ...], out_path: Path, index_type: str, nlist: int | None, nprobe: int | None, pq_m: int | None,
    hnsw_m: int, ef_search: int, recall_queries: int, recall_k: int, threads: int | None, progress: bool,
) -> None:
    """Index the embeddings of one or more EMB_DIRS (outputs of `facepipe embed`)."""
    from facepipe.index.gallery import GalleryError, IndexParams, build_gallery

    set_threads(threads)
    params = IndexParams(index_type=index_type, nlist=nlist, nprobe=nprobe, pq_m=pq_m, hnsw_m=hnsw_m,
                         ef_search=ef_search, threads=threads)
    try:
        info = build_gallery(emb_dirs, out_path, params, recall_queries=recall_queries, recall_k=recall_k, progress=progress)
    except (GalleryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out_path}: {info.count} faces, {info.dim}-d, {index_type}")
    if info.recall:
        recall = ", ".join(f"{k} {v:.4f}" for k, v in info.recall.items() if k != "queries")
        click.echo(f"recall vs exact flat search on {int(info.recall['queries'])} gallery queries: {recall}")


@index.command()
@click.argument("gallery_path", metavar="GALLERY", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("query", type=click.Path(exists=True, path_type=Path))
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="results.csv or results.parquet [default: print a table].")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF: cells visited per query.")
@click.option("--ef-search", type=click.IntRange(min=1), default=None, help="HNSW: search breadth.")
@detector_option
@detector_weights_option
@min_score_option
@device_option
@threads_option
@precision_option
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
def search(
    gallery_path: Path, query: Path, k: int, out_path: Path | None, nprobe: int | None, ef_search: int | None,
    detector: str, detector_weights: str | None, min_score: float, device: str, threads: int | None, batch_size: int,
    precision: str = "fp32",
) -> None:
    """Find the K nearest gallery faces of QUERY.

    QUERY is an image (every detected face is a query: detect, align, embed with the gallery's model), a
    folder of aligned crops, or an embedding folder from `facepipe embed`.
    """
    from facepipe.index.gallery import Gallery, GalleryError
    from facepipe.index.query import QueryError, embed_query
    from facepipe.index.thresholds import CALIBRATE_HINT, calibration_for

    device = resolve_device(device)
    set_threads(threads)
    check_detector_precision(precision, detector, device)  # the embedder runs at the gallery's own precision
    if out_path is not None and out_path.suffix.lower() not in (".csv", ".parquet"):
        raise click.BadParameter("use a .csv or .parquet file name", param_hint="--out")
    try:
        gallery = Gallery(gallery_path)
        gallery.set_search_params(nprobe=nprobe, ef_search=ef_search)
        queries = embed_query(query, gallery.info.spec, detector=detector, detector_weights=detector_weights,
                              min_score=min_score, device=device, batch_size=batch_size,
                              detector_options={"precision": precision} if precision != "fp32" else None)
        if not len(queries.names):
            raise click.ClickException(f"no usable query face in {query}")
        scores, ids = gallery.search(queries.embeddings, k)
        table = gallery.results_table(queries.names, scores, ids, queries.details)
    except (GalleryError, QueryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    spec = gallery.info.spec
    calibration = calibration_for(spec.get("model"), spec.get("weights"))
    guidance = f"score = cosine similarity; {calibration.describe() if calibration else CALIBRATE_HINT}"
    if out_path is None:
        with_cols = ["query", "rank", "score", "identity", "path"]
        click.echo(table[with_cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        click.echo(guidance, err=True)
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    if out_path.suffix.lower() == ".csv":
        table.to_csv(tmp, index=False)
    else:
        table.to_parquet(tmp, index=False)
    tmp.replace(out_path)
    click.echo(f"{len(queries.names)} queries, top {k}: {out_path}")
    click.echo(guidance, err=True)
