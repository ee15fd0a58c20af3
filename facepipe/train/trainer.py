"""The RetinaFace training loop: SGD with warm-up and step decay, AMP on CUDA, checkpoints and resume.

Output directory layout (``--out``):

* ``config.json``               -- the run's ``TrainConfig``
* ``log.jsonl``                 -- one line per logged iteration (epoch, step, lr, loss parts, ``seconds`` of
  forward/backward/step and ``data_seconds`` spent waiting for the DataLoader)
* ``epochs.csv``                -- mean losses per epoch
* ``weights/epoch_NNN.pth``     -- plain state dicts in the Pytorch_Retinaface key layout (300 keys for
  mobilenet0.25): load with ``create_detector("retinaface", weights=...)`` or the reference ``detect.py``;
  ``epoch_000.pth`` is the starting point (the ``--weights`` given, or the random initialisation)
* ``final.pth``                 -- the last epoch's weights, same format
* ``resume.pt``                 -- model, optimizer, GradScaler, next epoch and step, RNG state: ``--resume``

Epochs are numbered from 1 everywhere a person reads them: ``log.jsonl``, ``epochs.csv``, the progress bar,
``resuming at epoch N`` and ``weights/epoch_NNN.pth`` all call the first epoch 1 (``epoch_000.pth`` is the state
before any training). ``start_epoch`` and ``next_epoch`` in ``resume.pt`` count completed epochs.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a truncated file.
The paper's mesh-decoder branch (dense 3D regression) is not trained: its 3D annotations are not public.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from facepipe.detection.priors import prior_boxes
from facepipe.io.atomic import atomic_path, atomic_write_text
from facepipe.io.files import first_line
from facepipe.models.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict
from facepipe.models.retinaface import MNET025_SPEC, R50_SPEC, RetinaFace, load_retinaface_weights
from facepipe.train.augment import EvalTransform, TrainAugment
from facepipe.train.data import FaceDetectionDataset, TrainSample, collate
from facepipe.train.loss import LossConfig, LossWeights, multibox_loss
from facepipe.train.matching import MatchConfig

BACKBONES = ("mobilenet0.25", "resnet50")


@dataclass
class TrainConfig:
    backbone: str = "mobilenet0.25"
    image_size: int = 640  # reference: 640 mnet, 840 resnet50
    batch_size: int = 32  # reference: 32 mnet, 24 resnet50
    epochs: int = 250  # reference: 250 mnet, 100 resnet50
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0  # linear warm-up from 1e-6 over this many epochs (fractions allowed)
    lr_steps: tuple[int, ...] | None = None  # epochs where lr *= gamma; None: 76% and 88% of epochs (190/220 of 250)
    gamma: float = 0.1
    negatives_per_positive: int = 7
    positive_iou: float = 0.35
    ignore_face_below_iou: float = 0.2
    box_weight: float = 2.0
    class_weight: float = 1.0
    landmark_weight: float = 1.0
    num_workers: int = 0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # used on CUDA only
    checkpoint_every: int = 10  # epochs
    log_every: int = 1  # iterations
    max_iters_per_epoch: int | None = None  # cap for quick runs; None = whole data set
    augment: bool = True  # False: pad to square and resize only (debugging, overfitting checks)
    init_weights: str | None = None  # a whole RetinaFace checkpoint (fine-tuning)
    backbone_weights: str | None = None  # an ImageNet backbone only (the reference's starting point)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {', '.join(BACKBONES)}")
        if self.image_size % 32 != 0:
            raise ValueError(f"image size must be a multiple of 32 (the coarsest stride), got {self.image_size}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch size and epochs must be at least 1")
        if self.lr_steps is not None:
            self.lr_steps = tuple(int(s) for s in self.lr_steps)

    def resolved_lr_steps(self) -> tuple[int, ...]:
        if self.lr_steps is not None:
            return self.lr_steps
        return (round(self.epochs * 190 / 250), round(self.epochs * 220 / 250))

    def loss_config(self) -> LossConfig:
        return LossConfig(
            match=MatchConfig(positive_iou=self.positive_iou, ignore_face_below_iou=self.ignore_face_below_iou),
            weights=LossWeights(box=self.box_weight, classification=self.class_weight, landmarks=self.landmark_weight),
            negatives_per_positive=self.negatives_per_positive,
        )


def learning_rate(config: TrainConfig, epoch: int, step_in_epoch: int, iters_per_epoch: int) -> float:
    """Linear warm-up from 1e-6 (reference ``adjust_learning_rate``), then ``lr * gamma ** #steps passed``."""
    progress = epoch + step_in_epoch / max(iters_per_epoch, 1)
    if config.warmup_epochs > 0 and progress < config.warmup_epochs:
        return 1e-6 + (config.lr - 1e-6) * progress / config.warmup_epochs
    decays = sum(1 for step in config.resolved_lr_steps() if epoch >= step)
    return config.lr * config.gamma**decays


def build_network(backbone: str) -> RetinaFace:
    return RetinaFace({"mobilenet0.25": MNET025_SPEC, "resnet50": R50_SPEC}[backbone])


# Classifier parts of ImageNet checkpoints that RetinaFace's trunk does not have.
_CLASSIFIER_PREFIXES = ("fc.", "avg.", "avgpool.", "classifier.")


def load_backbone_weights(model: RetinaFace, path: str | os.PathLike) -> None:
    """Load ImageNet weights into ``model.body`` (strict): the reference ``mobilenetV1X0.25_pretrain.tar``
    (``{"state_dict": {"module.stage1...", "module.fc..."}}``) or a torchvision ``resnet50`` state dict."""
    state_dict = read_state_dict(path)
    trunk = {}
    for key, value in state_dict.items():
        key = key[len("body."):] if key.startswith("body.") else key
        if not key.startswith(_CLASSIFIER_PREFIXES):
            trunk[key] = value
    load_state_dict_strict(model.body, trunk, source=str(path))


def compute_priors(image_size: int) -> torch.Tensor:
    return torch.from_numpy(prior_boxes(image_size, image_size).copy())


def _atomic_save(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain CPU state dict in the reference key layout (no ``module.`` prefix, fp32)."""
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


@dataclass
class TrainResult:
    out_dir: Path
    final_weights: Path
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    seconds_per_iter: float = float("nan")


class Trainer:
    def __init__(self, config: TrainConfig, samples: Sequence[TrainSample], out_dir: str | os.PathLike) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = torch.device(config.device)
        self.use_amp = config.amp and self.device.type == "cuda"
        transform = TrainAugment(config.image_size) if config.augment else EvalTransform(config.image_size)
        self.dataset = FaceDetectionDataset(samples, transform, seed=config.seed)
        torch.manual_seed(config.seed)  # network initialisation
        self.model = build_network(config.backbone).to(self.device)
        if config.init_weights and config.backbone_weights:
            raise ValueError("give either init weights (whole detector) or backbone weights, not both")
        if config.init_weights:
            self._load_init_weights(config.init_weights)
        if config.backbone_weights:
            load_backbone_weights(self.model, config.backbone_weights)
        self.priors = compute_priors(config.image_size).to(self.device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch = 0
        self.global_step = 0

    def _load_init_weights(self, path: str) -> None:
        if Path(path).suffix.lower() == ".onnx":
            raise CheckpointError("--weights for training must be a .pth state dict (ONNX exports have BatchNorm folded)")
        load_retinaface_weights(self.model, path)

    @property
    def resume_path(self) -> Path:
        return self.out_dir / "resume.pt"

    def iters_per_epoch(self) -> int:
        full = math.ceil(len(self.dataset) / self.config.batch_size)
        cap = self.config.max_iters_per_epoch
        return full if cap is None else min(full, cap)

    def resume(self, path: str | os.PathLike | None = None) -> None:
        path = Path(path) if path else self.resume_path
        if not path.is_file():
            raise CheckpointError(f"resume file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved_backbone = state["config"]["backbone"]
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on a damaged file
            raise CheckpointError(f"{path} is not a readable resume file ({first_line(exc)}): start a new run") from None
        if saved_backbone != self.config.backbone:
            raise CheckpointError(f"{path} was trained with backbone {saved_backbone}, not {self.config.backbone}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.start_epoch = int(state["next_epoch"])
            self.global_step = int(state["global_step"])
            torch.set_rng_state(state["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        except Exception as exc:  # missing keys, mis-shaped tensors, wrong types: the file does not fit this run
            raise CheckpointError(f"{path} does not fit this run ({first_line(exc)})") from None

    def _save_resume(self, next_epoch: int) -> None:
        state = {
            "model": export_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "next_epoch": next_epoch,
            "global_step": self.global_step,
            "config": json.loads(json.dumps(asdict(self.config))),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        _atomic_save(state, self.resume_path)

    def _loader(self, epoch: int) -> DataLoader:
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.config.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def train_step(self, images: torch.Tensor, targets: list[torch.Tensor], lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            box_pred, class_logits, landmark_pred = self.model.forward_logits(images)
        parts = multibox_loss(box_pred, class_logits, landmark_pred, targets, self.priors, self.config.loss_config())
        if not torch.isfinite(parts.total):
            raise FloatingPointError(f"loss is {float(parts.total)} at step {self.global_step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        return parts.as_floats()

    def fit(self, epochs: int | None = None, show_progress: bool = True) -> TrainResult:
        """Train from ``start_epoch`` up to ``epochs`` (default: the configured number)."""
        config = self.config
        end_epoch = config.epochs if epochs is None else epochs
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.json", json.dumps(asdict(config), indent=2) + "\n")
        iters = self.iters_per_epoch()
        result = TrainResult(self.out_dir, self.out_dir / "final.pth")
        step_seconds: list[float] = []
        self.model.train()
        initial = self.out_dir / "weights" / "epoch_000.pth"
        if self.start_epoch == 0 and not initial.exists():
            _atomic_save(export_state_dict(self.model), initial)  # the baseline every later epoch is compared with
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as log:
            for epoch in range(self.start_epoch, end_epoch):
                sums: dict[str, float] = {}
                count = 0
                loader = self._loader(epoch)
                previous_end = time.perf_counter()
                bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{end_epoch}", disable=not show_progress, leave=False)
                for step_in_epoch, (images, targets) in enumerate(loader):
                    if step_in_epoch >= iters:
                        break
                    lr = learning_rate(config, epoch, step_in_epoch, iters)
                    started = time.perf_counter()
                    record = self.train_step(images, targets, lr)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - started
                    data_seconds = started - previous_end  # waiting for the DataLoader (decode + augment)
                    step_seconds.append(seconds)
                    for key, value in record.items():
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                    if self.global_step % config.log_every == 0:
                        entry = {"epoch": epoch + 1, "step": self.global_step, "lr": lr, "seconds": round(seconds, 4),
                                 "data_seconds": round(data_seconds, 4), **record}
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}")
                    bar.update(1)
                    previous_end = time.perf_counter()
                bar.close()
                means = {key: value / max(count, 1) for key, value in sums.items()}
                means["epoch"] = epoch + 1
                result.epoch_losses.append(means)
                self._append_epoch_csv(means)
                last = epoch + 1 == end_epoch
                if last or (epoch + 1) % config.checkpoint_every == 0:
                    _atomic_save(export_state_dict(self.model), self.out_dir / "weights" / f"epoch_{epoch + 1:03d}.pth")
                self._save_resume(epoch + 1)
                self.start_epoch = epoch + 1
        _atomic_save(export_state_dict(self.model), result.final_weights)
        if step_seconds:
            # The first steps include allocator and cache warm-up; report the median of the rest.
            steady = sorted(step_seconds[1:] or step_seconds)
            result.seconds_per_iter = steady[len(steady) // 2]
        return result

    def _append_epoch_csv(self, means: dict[str, float]) -> None:
        path = self.out_dir / "epochs.csv"
        columns = ["epoch", "loss", "loss_box", "loss_cls", "loss_landm", "num_pos", "num_neg"]
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(means)
