"""``facepipe eval widerface``: detect over WIDER FACE val images (or reuse predictions) and report easy/medium/hard AP."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
from tqdm import tqdm

from facepipe.commands.common import (
    apply_pack,
    detector_option,
    detector_weights_option,
    device_option,
    pack_option,
    set_threads,
    precision_option,
    threads_option,
)
from facepipe.commands.detect import InputImage, build_detector, detect_batch, detector_options, iter_loaded_batches
from facepipe.evaluation import widerface as wider
from facepipe.io.atomic import atomic_write_text
from facepipe.io.files import FileReadError, read_text_bounded
from facepipe.io.images import list_images

# Settings of the reference evaluation run (Pytorch_Retinaface test_widerface.py): every box above 0.02 is
# kept, so that the precision-recall curve reaches low scores.
EVAL_SCORE_THRESHOLD = 0.02
RUN_INFO_FILE = "facepipe_run.json"


def _write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _read_run_info(path: Path) -> dict:
    try:
        info = json.loads(read_text_bounded(path, 1 << 20))
    except (FileReadError, ValueError) as exc:
        raise click.ClickException(f"{path}: not a readable run description ({exc}); delete it or use another --predictions folder") from None
    if not isinstance(info, dict):
        raise click.ClickException(f"{path}: not a readable run description (not a JSON object)")
    return info


def _check_run_info(prediction_dir: Path, run_info: dict) -> None:
    """Refuse to mix predictions of different detector settings (or of unknown origin) in one folder."""
    path = prediction_dir / RUN_INFO_FILE
    if not path.is_file() and any(prediction_dir.glob("*/*.txt")):
        raise click.UsageError(
            f"{prediction_dir} holds prediction files of unknown origin but not for every image; "
            "complete them, or use another --predictions folder"
        )
    if path.is_file():
        previous = _read_run_info(path)
        if previous != run_info:
            raise click.UsageError(
                f"{prediction_dir} holds predictions made with {previous}, not {run_info}; "
                "use another --predictions folder (or delete this one)"
            )
    else:
        _write_json_atomic(path, run_info)


@click.command()
@click.option(
    "--images", "images_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
    help="WIDER val images laid out <event>/<name>.jpg (all of them or a subset).",
)
@click.option(
    "--gt", "gt_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Report .json.")
@click.option(
    "--predictions", "prediction_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Prediction folder <event>/<name>.txt: existing files are evaluated as they are, missing ones are "
    "detected and written here (default: a temporary folder).",
)
@detector_option
@detector_weights_option
@pack_option
@click.option(
    "--scale", type=click.Choice(["original", "fixed", "multiscale"]), default=None,
    help="original: no resize; fixed: 1600 short side / 2150 long side (SCRFD: det_size letterbox); multiscale: "
    "pyramid + flip. Default: original for RetinaFace, the det_size letterbox for SCRFD.",
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the PR curves to this .png.")
@device_option
@threads_option
@precision_option
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Images per detector call.")
def widerface(
    images_dir: Path | None,
    gt_dir: Path,
    out: Path,
    prediction_dir: Path | None,
    detector: str,
    detector_weights: str | None,
    scale: str | None,
    plot: Path | None,
    device: str,
    threads: int | None,
    batch_size: int,
    precision: str = "fp32",
    pack: Path | None = None,
) -> None:
    """WIDER FACE val easy / medium / hard AP (official protocol) over the given images.

    Only the images under --images count (faces of other val images are left out), so a subset gives a
    subset AP. Without --images, the images that have a file in --predictions are evaluated.
    """
    detector, detector_weights = apply_pack(pack, detector, detector_weights)
    try:
        ground_truth = wider.load_ground_truth(gt_dir)
    except wider.WiderFormatError as exc:
        raise click.UsageError(str(exc)) from None

    if images_dir is None:
        if prediction_dir is None:
            raise click.UsageError("give --images (to run the detector) or --predictions (to evaluate existing files)")
        keys = None
        sources: list[InputImage] = []
    else:
        paths = list_images(images_dir)
        if not paths:
            raise click.UsageError(f"no images under {images_dir}")
        sources = [InputImage(p, p.relative_to(images_dir)) for p in paths]
        keys = [wider.image_key(p) for p in paths]
        unknown = [k for k in keys if k not in ground_truth]
        if unknown:
            raise click.UsageError(
                f"{len(unknown)} image(s) under {images_dir} are not WIDER val images, e.g. {unknown[0]} "
                "(expected <event>/<name>.jpg as in WIDER_val/images)"
            )

    with tempfile.TemporaryDirectory(prefix="facepipe_wider_") as scratch:
        folder = Path(scratch) if prediction_dir is None else prediction_dir
        missing = [s for s in sources if not wider.prediction_path(folder, wider.image_key(s.path)).is_file()]
        run_info = {"detector": detector, "weights": detector_weights, "scale": scale or ("letterbox" if detector == "scrfd" else "original")}
        if precision != "fp32":  # predictions of another precision are another run (fp32 folders stay valid)
            run_info["precision"] = precision
        if missing:
            # Build the detector first: bad settings or weights must fail before the folder is claimed.
            options = detector_options(detector, batch_size, EVAL_SCORE_THRESHOLD, scale, precision, device)
            set_threads(threads)
            model = build_detector(detector, detector_weights, device, **options)
            _check_run_info(folder, run_info)
            _detect_into(folder, missing, model, batch_size)
        elif sources:
            click.echo(f"all {len(sources)} prediction files exist in {folder}: evaluating them", err=True)
        info_path = folder / RUN_INFO_FILE
        made_with = _read_run_info(info_path) if info_path.is_file() else {}
        try:
            predictions = wider.read_predictions(folder)
            result = wider.evaluate(predictions, ground_truth, images=keys)
        except wider.WiderFormatError as exc:
            raise click.ClickException(str(exc)) from None

    report = {**result.to_dict(), "predictions": None if prediction_dir is None else str(prediction_dir)}
    report.update(made_with)
    _write_json_atomic(out, report)
    if plot is not None:
        wider.plot_pr_curves(result, plot)
    click.echo(result.table())


def _detect_into(folder: Path, sources: list[InputImage], model, batch_size: int) -> None:
    with tqdm(total=len(sources), unit="img", desc="WIDER detect") as progress:
        for batch in iter_loaded_batches(sources, batch_size):
            broken = [item for item in batch if item.error is not None]
            if broken:
                raise click.ClickException(f"cannot read {broken[0].source.path}: {broken[0].error}")
            results = detect_batch(model, [item.image for item in batch])
            for item, faces in zip(batch, results):
                if isinstance(faces, Exception):
                    raise click.ClickException(f"detection failed on {item.source.path}: {faces}")
                key = wider.image_key(item.source.path)
                rows = wider.faces_to_rows(faces, plus_one=model.name in wider.PLUS_ONE_WRITERS)
                wider.write_prediction_file(wider.prediction_path(folder, key), rows)
            progress.update(len(batch))
