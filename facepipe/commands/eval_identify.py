"""``facepipe eval identify``: 1:N identification (CMC, TPIR@FPIR) on your own embedding folders."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("identify")
@click.option("--gallery", "gallery_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Embedding folder of the enrolled people (identity = folder; one template per identity).")
@click.option("--probes", "probe_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Embedding folder of the searches (mated when the folder's identity is in the gallery).")
@click.option("--non-mated", "non_mated_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Embedding folder of people known to be absent from the gallery (all non-mated searches).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Report (JSON).")
def identify(gallery_dir: Path, probe_dir: Path, non_mated_dir: Path | None, out: Path | None) -> None:
    """CMC at ranks 1/5/10/20 and TPIR at FPIR 0.01/0.1 (NIST definitions, as `eval ijbc --protocol 1n`)."""
    from facepipe.evaluation.identification import IdentificationInputError
    from facepipe.evaluation.identification import identify as run_identify
    from facepipe.io.atomic import atomic_write_text

    try:
        report = run_identify(gallery_dir, probe_dir, non_mated_dir)
    except IdentificationInputError as exc:
        raise click.ClickException(str(exc)) from None
    c = report.counts
    click.echo(f"gallery {c['gallery_identities']} identities ({c['gallery_images']} images); {c['mated_searches']} mated, "
               f"{c['non_mated_searches']} non-mated searches; {c['skipped_rows']} rows skipped")
    click.echo("  ".join(f"{k.replace('rank', 'rank-')} {v * 100:.2f}" for k, v in report.cmc.items()))
    click.echo("  ".join(f"TPIR@FPIR={k} {v * 100:.2f}" for k, v in report.tpir.items()))
    if out is not None:
        atomic_write_text(out, json.dumps(report.to_dict(), indent=1))
        click.echo(f"report written to {out}")
