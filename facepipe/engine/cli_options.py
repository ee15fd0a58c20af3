"""The ``--engine`` / ``--ray-address`` / ``--num-gpus`` options shared by align, embed and eval ijbc."""

from __future__ import annotations

import click

from facepipe.engine.ray_engine import RayEngineError, RayOptions, import_ray

engine_option = click.option(
    "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="local: processes on this machine; ray: an actor pool on a Ray cluster (pip install 'facepipe[ray]').",
)
ray_address_option = click.option(
    "--ray-address", default=None, metavar="ADDR",
    help="--engine ray: cluster to join ('auto' for `ray start --head` here, ray://HOST:10001 remote) "
    "[default: $RAY_ADDRESS, else a local cluster].",
)
num_gpus_option = click.option(
    "--num-gpus", type=click.FloatRange(min=0), default=None, metavar="G",
    help="--engine ray: GPUs per model actor; 0.5 = two actors per GPU [default: 0.5 if the cluster has GPUs, else CPU actors].",
)


def engine_options(engine: str, ray_address: str | None, num_gpus: float | None, actors: int | None = None) -> RayOptions | None:
    """``None`` for the local engine; the Ray options for ``--engine ray`` after checking that Ray imports."""
    if engine == "local":
        given = [flag for flag, value in (("--ray-address", ray_address), ("--num-gpus", num_gpus)) if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only with --engine ray")
        return None
    try:
        import_ray()
        return RayOptions(address=ray_address, actors=actors, num_gpus=num_gpus)
    except RayEngineError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
