"""``facepipe audit EMB --out DIR``: label noise, duplicate identities, near-duplicates and evaluation overlap."""

from __future__ import annotations

from pathlib import Path

import click

from facepipe.commands.common import device_option, resolve_device
from facepipe.engine.cli_options import engine_option, engine_options, ray_address_option


@click.command()
@click.argument("emb_dir", metavar="EMB", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the tables (csv + parquet), summary.json and report.html.")
@click.option("--against", "against", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Evaluation set to check for overlap: an embedding folder, an insightface .bin or an IJB-C / IJB-B "
                   "layout root (meta/, loose_crop/; identity = subject); the last two are embedded with the training "
                   "set's model (IJB features cached in OUT/ijb_feature_cache). Repeatable.")
@click.option("--image-threshold", type=click.FloatRange(-1, 1), default=None, help="Override T_image (label noise, image overlap).")
@click.option("--identity-threshold", type=click.FloatRange(-1, 1), default=None, help="Override T_identity (duplicate identities, overlap).")
@click.option("--copy-threshold", type=click.FloatRange(-1, 1), default=None, help="Override T_copy (near-duplicate images).")
@click.option("--write-clean", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the training crops without flagged items, one relative path a line (for `facepipe align LIST --root ALIGNED`).")
@click.option("--keep-overlap", is_flag=True, help="With --write-clean: keep identities that overlap an evaluation set.")
@click.option("--max-cases", type=click.IntRange(min=1), default=200, show_default=True, help="Flagged cases shown per check in report.html.")
@device_option
@engine_option
@ray_address_option
def audit(emb_dir, out_dir, against, image_threshold, identity_threshold, copy_threshold, write_clean, keep_overlap,
          max_cases, device, engine, ray_address) -> None:
    """Audit a training set from its embeddings (identity = folder). See facepipe.audit.checks for the rules.
    With --engine ray the per-identity work (robust centres, leave-one-out scores) runs as Ray tasks over chunks
    of identities, with the same results."""
    from facepipe.audit.data import AuditInputError, ijb_target, load_bin_set, load_embedding_folder, load_ijb_set
    from facepipe.audit.report import write_report
    from facepipe.audit.run import audit as run_audit
    from facepipe.audit.run import clean_list, write_outputs
    from facepipe.engine.ray_engine import RayEngineError
    from facepipe.io.atomic import atomic_write_text

    device = resolve_device(device)  # embeds --against .bin sets
    ray_options = engine_options(engine, ray_address, None)

    try:
        train = load_embedding_folder(emb_dir)
        if not train.has_identities or len(train.names) < 2:
            raise AuditInputError(f"{emb_dir}: needs identity folders (at least 2); found {len(train.names)}")
        others = []
        for path in against:
            if path.is_dir() and ijb_target(path) is not None:
                others.append(load_ijb_set(path, train.model, out_dir / "ijb_feature_cache", device=device))
            elif path.is_dir():
                others.append(load_embedding_folder(path))
            elif path.suffix == ".bin":
                others.append(load_bin_set(path, train.model, device=device))
            else:
                raise AuditInputError(f"{path}: --against takes an embedding folder, an IJB-C layout root or a .bin file")
        overrides = {"image": image_threshold, "identity": identity_threshold, "copy": copy_threshold}
        result = run_audit(train, others, overrides, engine=engine, ray_options=ray_options)
    except (AuditInputError, RayEngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    write_outputs(result, out_dir)
    write_report(train, result, out_dir / "report.html", max_cases)
    s = result.summary
    t = result.thresholds
    click.echo(f"{s['images']} images, {s['identities']} identities ({s['single_image_identities']} with one image); skipped {s['skipped']}")
    for other in s["against"]:
        click.echo(f"against {other['name']}: {other['images']} images, {other['identities']} identities; skipped {other['skipped']}")
    click.echo(f"thresholds: image {t.image:.4f}, identity {t.identity:.4f}, copy {t.copy:.4f}")
    for name, count in s["flagged"].items():
        click.echo(f"  {name:<22} {count} flagged")
    if write_clean is not None:
        kept = clean_list(train, result, drop_overlap=not keep_overlap)
        atomic_write_text(write_clean, "".join(f"{path}\n" for path in kept))
        click.echo(f"clean list: {len(kept)} of {s['images']} crops -> {write_clean}")
    click.echo(f"report: {out_dir / 'report.html'}")
