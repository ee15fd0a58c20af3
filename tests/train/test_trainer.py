import json

import cv2

import numpy as np
import pytest
import torch

from facepipe.detection import create_detector
from facepipe.models.checkpoint import CheckpointError, read_state_dict
from facepipe.train.data import read_annotations
from facepipe.train.trainer import TrainConfig, Trainer, learning_rate
from facepipe.weights import bundled
from tests.conftest import shared_path


def _wider_samples(count: int):
    mat = shared_path("widerface", "wider_face_val.mat")
    samples = read_annotations("wider-mat", mat, shared_path("widerface", "val_images"))
    # images with a handful of not-too-small faces learn fastest
    samples = [s for s in samples if 1 <= len(s.faces) <= 8 and (s.faces.boxes[:, 2] - s.faces.boxes[:, 0]).min() > 30]
    return samples[:count]


def test_learning_rate_warmup_and_steps():
    config = TrainConfig(epochs=250, lr=1e-3, warmup_epochs=5)
    assert learning_rate(config, 0, 0, 100) == pytest.approx(1e-6)
    assert learning_rate(config, 2, 50, 100) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert learning_rate(config, 5, 0, 100) == pytest.approx(1e-3)
    assert config.resolved_lr_steps() == (190, 220)
    assert learning_rate(config, 189, 99, 100) == pytest.approx(1e-3)
    assert learning_rate(config, 190, 0, 100) == pytest.approx(1e-4)
    assert learning_rate(config, 220, 0, 100) == pytest.approx(1e-5)
    assert TrainConfig(epochs=100, lr_steps=(70, 90)).resolved_lr_steps() == (70, 90)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backbone"):
        TrainConfig(backbone="vgg")
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(image_size=300)


def test_loss_is_finite_and_decreases_on_four_wider_images(tmp_path):
    samples = _wider_samples(4)
    config = TrainConfig(image_size=320, batch_size=4, epochs=8, lr=1e-2, augment=False, checkpoint_every=100)
    result = Trainer(config, samples, tmp_path / "run").fit(show_progress=False)
    losses = [e["loss"] for e in result.epoch_losses]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses  # measured: 16.8 -> 10.1, monotone
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {"loss", "loss_box", "loss_cls", "loss_landm", "lr", "seconds"} <= set(log[0])
    assert (tmp_path / "run" / "epochs.csv").read_text().count("\n") == 9


def test_checkpoint_is_a_reference_state_dict_loadable_by_the_detector(tmp_path):
    samples = _wider_samples(2)
    official = bundled("retinaface_mobilenet0.25.pth")
    config = TrainConfig(image_size=128, batch_size=2, epochs=1, lr=1e-4, init_weights=str(official))
    trainer = Trainer(config, samples, tmp_path / "run")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    reference = torch.load(official, map_location="cpu", weights_only=True)
    assert all(torch.equal(start[k], reference[k].cpu()) for k in reference if not k.endswith("num_batches_tracked"))
    result = trainer.fit(show_progress=False)
    saved = torch.load(result.final_weights, map_location="cpu", weights_only=True)
    assert list(saved) == list(reference)  # same 300 keys in the same order, no module. prefix
    assert all(saved[k].shape == reference[k].shape for k in reference)
    assert not torch.equal(saved["ClassHead.0.conv1x1.weight"], reference["ClassHead.0.conv1x1.weight"].cpu())
    detector = create_detector("retinaface", weights=str(result.final_weights))
    faces = detector.detect([cv2.imread(str(shared_path("images", "group", "t1.jpg")))])[0]
    assert 4 <= len(faces) <= 8  # one tiny fine-tuning step keeps the official detector working (6 faces)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    samples = _wider_samples(3)
    config = TrainConfig(image_size=96, batch_size=2, epochs=2, lr=1e-3, checkpoint_every=1, seed=5)
    straight = Trainer(config, samples, tmp_path / "straight").fit(show_progress=False)

    first = Trainer(config, samples, tmp_path / "split")
    first.fit(epochs=1, show_progress=False)
    resumed = Trainer(config, samples, tmp_path / "split")
    resumed.resume()
    assert resumed.start_epoch == 1 and resumed.global_step == 2
    split = resumed.fit(show_progress=False)

    a = read_state_dict(straight.final_weights)
    b = read_state_dict(split.final_weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.epoch_losses[1]["loss"] == pytest.approx(split.epoch_losses[-1]["loss"], rel=0, abs=0)
    with pytest.raises(CheckpointError, match="backbone"):
        Trainer(TrainConfig(backbone="resnet50", image_size=96), samples, tmp_path / "other").resume(tmp_path / "split" / "resume.pt")


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    samples = _wider_samples(4)
    batches = {}
    for workers in (0, 2):
        config = TrainConfig(image_size=64, batch_size=2, epochs=1, num_workers=workers, seed=9)
        trainer = Trainer(config, samples, tmp_path / f"w{workers}")
        batches[workers] = list(trainer._loader(epoch=1))
    for (images_a, targets_a), (images_b, targets_b) in zip(batches[0], batches[2]):
        assert torch.equal(images_a, images_b)
        assert all(torch.equal(a, b) for a, b in zip(targets_a, targets_b))


@pytest.mark.parametrize("backbone", ["mobilenet0.25", "resnet50"])
def test_imagenet_backbone_weights_load_in_their_released_layouts(tmp_path, backbone):
    """Checkpoints written in the released key layouts: the reference MobileNet pretrain .tar
    ({"state_dict": module.-prefixed, with fc}) and torchvision resnet50 (no prefix, with fc)."""
    from facepipe.train.trainer import build_network, load_backbone_weights

    torch.manual_seed(0)
    source = build_network(backbone).body
    body = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    if backbone == "mobilenet0.25":
        released = {"state_dict": {**{f"module.{k}": v for k, v in body.items()},
                                   "module.fc.weight": torch.zeros(1000, 256), "module.fc.bias": torch.zeros(1000)},
                    "epoch": 250}
    else:
        released = {**body, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "imagenet.pth"
    torch.save(released, path)
    model = build_network(backbone)
    load_backbone_weights(model, path)
    loaded = model.body.state_dict()
    assert all(torch.equal(loaded[k], body[k]) for k in body if not k.endswith("num_batches_tracked"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"stage9.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_backbone_weights(model, wrong)
