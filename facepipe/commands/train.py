"""``facepipe train retinaface``: train or fine-tune RetinaFace (MobileNet-0.25 / ResNet-50) on face boxes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from facepipe.commands.common import device_option, resolve_device, set_threads, threads_option

# Reference training recipes (Pytorch_Retinaface data/config.py): used where an option is not given.
BACKBONE_PRESETS = {
    "mobilenet0.25": {"image_size": 640, "batch_size": 32, "epochs": 250, "lr_steps": (190, 220)},
    "resnet50": {"image_size": 840, "batch_size": 24, "epochs": 100, "lr_steps": (70, 90)},
}


def _parse_steps(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("use comma-separated epochs, e.g. 190,220", param_hint="--lr-steps") from None


@click.group()
def train() -> None:
    """Train detectors."""


@train.command()
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Annotation file: label.txt, .jsonl or wider_face_{train,val}.mat.")
@click.option("--format", "data_format", type=click.Choice(["label-txt", "jsonl", "wider-mat"]), default="label-txt",
              show_default=True, help="label-txt: retinaface_gt_v1.1 with landmarks; jsonl: "
              '{"path", "faces": [{"box": [x1,y1,x2,y2], "landmarks": [[x,y]*5] or null}]} per line; '
              "wider-mat: WIDER .mat boxes (no landmarks; only images present under --images).")
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Root the annotation paths are relative to.")
@click.option("--backbone", type=click.Choice(sorted(BACKBONE_PRESETS)), default="mobilenet0.25", show_default=True)
@click.option("--weights", "init_weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Initial weights (.pth, Pytorch_Retinaface layout), e.g. mobilenet0.25_Final.pth to fine-tune. "
              "Default: random initialisation.")
@click.option("--backbone-weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="ImageNet backbone weights to start from, as the reference does: mobilenetV1X0.25_pretrain.tar "
              "or torchvision resnet50 .pth (classifier keys are dropped).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: weights/, final.pth, resume.pt, log.jsonl, epochs.csv, config.json.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: 250 (mnet) / 100 (r50).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 32 (mnet) / 24 (r50).")
@click.option("--image-size", type=click.IntRange(min=32), default=None,
              help="Square training size, multiple of 32. Default: 640 (mnet) / 840 (r50).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lr-steps", default=None, help="Epochs where lr is multiplied by 0.1, e.g. 190,220 "
              "(default: the reference steps for 250/100 epochs, scaled to --epochs).")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True,
              help="Linear warm-up from 1e-6 over this many epochs.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--negpos", type=click.IntRange(min=1), default=7, show_default=True,
              help="OHEM: hard negatives kept per positive prior.")
@click.option("--box-weight", type=float, default=2.0, show_default=True, help="Reference code 2.0; paper 0.25.")
@click.option("--landmark-weight", type=float, default=1.0, show_default=True, help="Reference code 1.0; paper 0.1.")
@click.option("--positive-iou", type=float, default=0.35, show_default=True, help="Prior-face IoU for a positive.")
@click.option("--ignore-iou", type=float, default=0.2, show_default=True,
              help="Faces whose best prior has a lower IoU are left out (no forced match).")
@click.option("--no-augment", is_flag=True, help="Only pad to square and resize (no crop, colour, flip).")
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs.")
@click.option("--max-iters-per-epoch", type=click.IntRange(min=1), default=None, help="Cap per epoch (quick runs).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its resume.pt.")
@device_option
@threads_option
def retinaface(
    data_path: Path, data_format: str, images_dir: Path, backbone: str, init_weights: str | None,
    backbone_weights: str | None, out_dir: Path,
    epochs: int | None, batch_size: int | None, image_size: int | None, lr: float, lr_steps: str | None,
    warmup_epochs: float, momentum: float, weight_decay: float, negpos: int, box_weight: float,
    landmark_weight: float, positive_iou: float, ignore_iou: float, no_augment: bool, no_amp: bool, workers: int,
    seed: int, checkpoint_every: int, max_iters_per_epoch: int | None, limit: int | None, resume: bool,
    device: str, threads: int | None,
) -> None:
    """Train RetinaFace: multi-task loss (softmax + OHEM, smooth-L1 boxes and 5 landmarks), SGD, step schedule.

    Faces without landmarks (label -1) train the box and class heads only. The paper's mesh-decoder branch
    (dense 3D face mesh) is not implemented: the 3D data it needs are not public. Checkpoints are plain state
    dicts in the Pytorch_Retinaface key layout: evaluate with
    `facepipe eval widerface --detector retinaface --detector-weights OUT/final.pth ...`.
    """
    from facepipe.models.checkpoint import CheckpointError
    from facepipe.train.data import AnnotationError, read_annotations
    from facepipe.train.trainer import TrainConfig, Trainer

    set_threads(threads)
    device = resolve_device(device)
    preset = BACKBONE_PRESETS[backbone]
    epochs = epochs or preset["epochs"]
    steps = _parse_steps(lr_steps)
    if steps is None:
        steps = tuple(round(s * epochs / preset["epochs"]) for s in preset["lr_steps"])
    try:
        config = TrainConfig(
            backbone=backbone, image_size=image_size or preset["image_size"], batch_size=batch_size or preset["batch_size"],
            epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            lr_steps=steps, negatives_per_positive=negpos, positive_iou=positive_iou, ignore_face_below_iou=ignore_iou,
            box_weight=box_weight, landmark_weight=landmark_weight, num_workers=workers, seed=seed, device=device,
            amp=not no_amp, checkpoint_every=checkpoint_every, max_iters_per_epoch=max_iters_per_epoch,
            augment=not no_augment, init_weights=init_weights, backbone_weights=backbone_weights,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if (out_dir / "resume.pt").exists() and not resume:
        raise click.UsageError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    try:
        samples = read_annotations(data_format, data_path, images_dir)
    except (AnnotationError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    if limit is not None:
        samples = samples[:limit]
    num_faces = sum(len(s.faces) for s in samples)
    with_landmarks = sum(int(s.faces.has_landmarks.sum()) for s in samples)
    click.echo(f"{len(samples)} images, {num_faces} faces ({with_landmarks} with landmarks); {backbone} "
               f"{config.image_size}px, batch {config.batch_size}, {config.epochs} epochs, lr steps {steps}, {device}",
               err=True)
    try:
        trainer = Trainer(config, samples, out_dir)
        if resume:
            trainer.resume()
            click.echo(f"resuming at epoch {trainer.start_epoch + 1}", err=True)
        result = trainer.fit()
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    summary = {
        "final_weights": str(result.final_weights),
        "seconds_per_iter": round(result.seconds_per_iter, 4),
        "last_epoch": result.epoch_losses[-1] if result.epoch_losses else None,
    }
    click.echo(json.dumps(summary))
