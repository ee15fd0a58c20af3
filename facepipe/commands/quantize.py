"""``facepipe quantize``: an int8 copy of an embedder, calibrated on your own aligned face crops, cached."""

from __future__ import annotations

from pathlib import Path

import click

from facepipe.commands.common import model_option, set_threads, threads_option


@click.command()
@model_option
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Model weights (.pth / .onnx); default: the bundled weights where available.")
@click.option("--onnx-preset", "preset", default=None, help="--model onnx: preprocessing preset (e.g. faceplugin).")
@click.option("--calibrate", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of aligned face crops (e.g. `facepipe align` output); up to 256 are used.")
@threads_option
def quantize(model: str, weights: str | None, preset: str | None, calibrate: Path, threads: int | None) -> None:
    """Calibrate and cache the int8 model that `--precision int8` then runs.

    The cache key is the model's bytes and the crops' bytes: rerunning with the same model and crops reuses
    the file. The last calibration of a model is the one `--precision int8` uses.
    """
    from facepipe.embedding.base import create_embedder
    from facepipe.runtime.cpu import PrecisionError

    set_threads(threads)
    options = {"preset": preset} if model == "onnx" and preset else {}
    try:
        embedder = create_embedder(model, weights=weights, precision="int8", calibrate=str(calibrate), threads=threads, **options)
    except PrecisionError as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise click.ClickException(f"cannot quantize {model}: {exc}") from None
    from facepipe.runtime.quantize import int8_model_record

    record = int8_model_record(embedder.model_bytes)
    click.echo(f"int8 {model}: {record['path']} (calibrated on {record['crops']} crops of {record['calibration']})")
