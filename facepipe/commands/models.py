"""``facepipe models``: the registry with each model's preprocessing contract."""

from __future__ import annotations

import click

from facepipe.models.registry import get_config, list_models


@click.command()
@click.option("--kind", type=click.Choice(["detector", "embedder"]), default=None)
def models(kind: str | None) -> None:
    """List the registered model architectures and their input contracts."""
    header = f"{'name':<22}{'kind':<10}{'input':<11}{'colour':<7}{'mean':<22}{'std':<22}{'dim':<5}default weights"
    click.echo(header)
    for name in list_models(kind):  # type: ignore[arg-type]
        c = get_config(name)
        size = "any" if c.input_size is None else f"{c.input_size[0]}x{c.input_size[1]}"
        mean = ",".join(f"{v:g}" for v in c.mean)
        std = ",".join(f"{v:g}" for v in c.std)
        dim = "" if c.embedding_size is None else str(c.embedding_size)
        click.echo(f"{name:<22}{c.kind:<10}{size:<11}{c.input_format:<7}{mean:<22}{std:<22}{dim:<5}{c.default_weights or '-'}")
