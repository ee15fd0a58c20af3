"""GPU paths, checked against the CPU reference numbers. Skipped where CUDA is absent (CI has no GPU)."""

import cv2
import numpy as np
import pytest
import torch

from facepipe.alignment import norm_crop
from facepipe.detection import create_detector
from facepipe.embedding import create_embedder
from tests.conftest import shared_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    # cuDNN convolutions default to TF32 on Hopper/Ampere; parity with the float32 reference needs full precision.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _t1() -> np.ndarray:
    return cv2.imread(str(shared_path("images", "group", "t1.jpg")))


def _match_rows(found: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """For each expected row, the found row with the nearest box (max abs coordinate difference)."""
    distance = np.abs(found[None, :, :4] - expected[:, None, :4]).max(axis=2)
    return found[distance.argmin(axis=1)]


@pytest.mark.parametrize("fp16", [False, True])
def test_retinaface_cuda_matches_reference(fp16):
    golden = np.load(shared_path("golden", "retinaface_mnet_shared.npz"))["images/group/t1.jpg"]
    confident = golden[golden[:, 4] >= 0.5]
    detector = create_detector("retinaface", device="cuda", backend="torch", fp16=fp16, threshold=0.5)
    faces = detector.detect([_t1()])[0]
    found = np.stack([f.to_row() for f in faces])
    assert len(found) == len(confident)
    matched = _match_rows(found, confident)
    tolerance_px, tolerance_score = (1.0, 5e-3) if fp16 else (0.5, 2e-4)
    assert np.abs(matched[:, :4] - confident[:, :4]).max() < tolerance_px
    assert np.abs(matched[:, 5:] - confident[:, 5:]).max() < tolerance_px
    assert np.abs(matched[:, 4] - confident[:, 4]).max() < tolerance_score


def test_mtcnn_cuda_matches_reference():
    golden = np.load(shared_path("golden", "mtcnn_shared.npz"))
    boxes, probs = golden["images/group/t1.jpg/boxes"], golden["images/group/t1.jpg/probs"]
    faces = create_detector("mtcnn", device="cuda", order="area").detect([_t1()])[0]
    found = np.stack([f.to_row() for f in faces])
    assert len(found) == len(boxes)
    assert np.abs(found[:, :4] - boxes).max() < 1.0
    assert np.abs(found[:, 4] - probs).max() < 1e-3


@pytest.mark.parametrize("fp16", [False, True])
def test_mobilefacenet_cuda_matches_cpu(fp16):
    golden = np.load(shared_path("golden", "norm_crop.npz"))
    crops = golden["crops_bgr"]
    cpu = create_embedder("mobilefacenet", backend="torch").embed(crops)
    gpu = create_embedder("mobilefacenet", device="cuda", fp16=fp16).embed(crops)
    cosine = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosine.min() > (0.999 if fp16 else 0.99999)


def test_iresnet100_fp16_cuda_close_to_fp32(tmp_path):
    from facepipe.models.iresnet import iresnet100

    torch.manual_seed(0)
    model = iresnet100()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    image = cv2.imread(str(shared_path("images", "group", "Tom_Hanks_54745.png")))
    crops = np.stack([image, image[:, ::-1]])
    fp32 = create_embedder("iresnet100", weights=str(tmp_path / "backbone.pth"), device="cuda").embed(crops)
    fp16 = create_embedder("iresnet100", weights=str(tmp_path / "backbone.pth"), device="cuda", fp16=True).embed(crops)
    cosine = (fp32 * fp16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(fp16, axis=1)
    assert cosine.min() > 0.999


def test_alignment_from_cuda_detections_matches_reference_crop():
    golden = np.load(shared_path("golden", "norm_crop.npz"))
    face = create_detector("retinaface", device="cuda", backend="torch").detect([_t1()])[0][0]
    crop = norm_crop(_t1(), face.landmarks)
    assert np.abs(crop.astype(int) - golden["crops_bgr"][0]).mean() < 1.0
