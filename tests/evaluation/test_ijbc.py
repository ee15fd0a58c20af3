"""IJB-C protocol pieces against straightforward re-implementations written here (loops, brute-force ROC)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from facepipe.embedding.base import PairEmbedding
from facepipe.evaluation import ijbc, ijbc_features, ijbc_layout, metrics
from facepipe.evaluation.ijbc import ScoreConfig, TemplatePooling, parse_configs, pool_templates, score_pairs
from facepipe.evaluation.ijbc_features import FeatureCache
from facepipe.evaluation.metrics import roc_curve, tar_at_far


# ------------------------------------------------------------------ straightforward reference versions
def loop_template_features(feats: np.ndarray, scores: np.ndarray, templates, medias, config: ScoreConfig):
    """ijb_11 written out: per-image switches, then per template, per media mean, sum, L2."""
    x = feats[:, 0] + feats[:, 1] if config.flip else feats[:, 0].copy()
    if not config.norm_score:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if config.detector_score:
        x = x * scores[:, None]
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), x.shape[1]))
    for row, template in enumerate(unique_templates):
        (in_template,) = np.where(templates == template)
        media_feats = []
        for media in np.unique(medias[in_template]):
            (in_media,) = np.where(medias[in_template] == media)
            media_feats.append(np.mean(x[in_template][in_media], axis=0))
        out[row] = np.sum(media_feats, axis=0)
    return out / np.linalg.norm(out, axis=1, keepdims=True), unique_templates


def brute_force_roc(labels: np.ndarray, scores: np.ndarray):
    """Every distinct threshold counted directly, then sklearn's drop_intermediate rule written as a loop."""
    thresholds = np.unique(scores)[::-1]
    positives, negatives = labels.sum(), (1 - labels).sum()
    tps = [int(((scores >= t) & (labels == 1)).sum()) for t in thresholds]
    fps = [int(((scores >= t) & (labels == 0)).sum()) for t in thresholds]
    keep = [0]
    for i in range(1, len(tps) - 1):
        if fps[i + 1] - fps[i] != fps[i] - fps[i - 1] or tps[i + 1] - tps[i] != tps[i] - tps[i - 1]:
            keep.append(i)
    keep.append(len(tps) - 1)
    fpr = np.array([0] + [fps[i] for i in keep]) / negatives
    tpr = np.array([0] + [tps[i] for i in keep]) / positives
    return fpr, tpr, np.array([np.inf] + [thresholds[i] for i in keep])


def nearest_tar(fpr, tpr, x):
    """The reference's tuple-min over the flipped curve."""
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, index = min(zip(abs(fpr - x), range(len(fpr))))
    return tpr[index]


def synthetic_ijb(rng, num_subjects=30, dim=16):
    """Subjects -> templates (gallery + probes) -> media -> images, with identity structure and varied norms."""
    centres = rng.standard_normal((num_subjects, dim))
    templates, medias, subjects, feats = [], [], [], []
    template_id, media_id = 100, 5000
    gallery, probes = {}, []
    for subject in range(num_subjects):
        for kind in range(rng.integers(2, 4)):
            template_id += int(rng.integers(1, 7))  # sparse, unordered ids like IJB-C
            (gallery.__setitem__(subject, template_id) if kind == 0 else probes.append((template_id, subject)))
            for _ in range(rng.integers(1, 4)):
                media_id += int(rng.integers(1, 3))
                for _ in range(rng.integers(1, 5)):
                    templates.append(template_id)
                    medias.append(media_id)
                    subjects.append(subject)
    n = len(templates)
    subjects = np.array(subjects)
    base = centres[subjects] + 0.8 * rng.standard_normal((n, dim))
    feats = np.stack([base, base + 0.1 * rng.standard_normal((n, dim))], axis=1) * rng.uniform(5, 30, (n, 1, 1))
    order = rng.permutation(n)  # images of a template are not contiguous in the files
    t1, t2, labels = [], [], []
    for subject, g in gallery.items():
        for p, probe_subject in probes:
            t1.append(g)
            t2.append(p)
            labels.append(int(subject == probe_subject))
    return (
        feats[order].astype(np.float32),
        rng.uniform(0.5, 1.0, n).astype(np.float32)[order],
        np.array(templates)[order],
        np.array(medias)[order],
        np.array(t1),
        np.array(t2),
        np.array(labels, dtype=np.int8),
    )


# ---------------------------------------------------------------------------------------------- tests
def test_config_codes_round_trip_and_all():
    assert ScoreConfig().code == "N1D1F1"
    assert ScoreConfig.parse("n0d1f0") == ScoreConfig(norm_score=False, detector_score=True, flip=False)
    assert [c.code for c in parse_configs("all")] == ["N1D1F1", "N1D1F0", "N1D0F1", "N1D0F0", "N0D1F1", "N0D1F0", "N0D0F1", "N0D0F0"]
    assert [c.code for c in parse_configs("N1D1F1, N0D0F0,N1D1F1")] == ["N1D1F1", "N0D0F0"]
    for bad in ("N1D1", "N2D1F1", "D1N1F1", ""):
        with pytest.raises(ValueError):
            parse_configs(bad)


@pytest.mark.parametrize("config", parse_configs("all"), ids=lambda c: c.code)
def test_vectorised_pooling_and_scoring_equal_loops(config):
    rng = np.random.default_rng(7)
    feats, scores, templates, medias, t1, t2, labels = synthetic_ijb(rng)
    pooling = TemplatePooling.build(templates, medias)
    shards = [(s, feats[s : s + 37], scores[s : s + 37]) for s in range(0, len(feats), 37)]  # ragged shards
    ours = pool_templates(pooling, shards, [config])[config]
    expected, unique_templates = loop_template_features(feats, scores, templates, medias, config)
    np.testing.assert_array_equal(pooling.unique_templates, unique_templates)
    np.testing.assert_allclose(ours, expected, atol=1e-6)

    rows1, rows2 = pooling.template_rows(t1), pooling.template_rows(t2)
    loop_scores = np.array([expected[a] @ expected[b] for a, b in zip(rows1, rows2)])
    for block in (4, 64, 4096):  # product path, mixed, gather path
        np.testing.assert_allclose(score_pairs(ours, rows1, rows2, block=block), loop_scores, atol=1e-6)
    # Genuine pairs must score above impostors on this identity-structured data.
    assert loop_scores[labels == 1].mean() > loop_scores[labels == 0].mean() + 0.3


@pytest.mark.parametrize("block", [32, 300])  # product blocks; one sparse block gathered in chunks
def test_score_pairs_sparse_random_pairs(block):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((300, 8))
    rows1, rows2 = rng.integers(0, 300, 2000), rng.integers(0, 300, 2000)
    expected = np.einsum("ij,ij->i", feats[rows1], feats[rows2])
    np.testing.assert_allclose(score_pairs(feats, rows1, rows2, block=block, gather_chunk=128), expected)


def test_pooling_weights_are_media_means():
    pooling = TemplatePooling.build(np.array([9, 9, 9, 4, 9]), np.array([1, 1, 2, 1, 1]))
    np.testing.assert_array_equal(pooling.unique_templates, [4, 9])
    np.testing.assert_array_equal(pooling.template_index, [1, 1, 1, 0, 1])
    # template 9, media 1 has three images (1/3 each), media 2 one; template 4's media 1 is a different media.
    np.testing.assert_allclose(pooling.image_weight, [1 / 3, 1 / 3, 1.0, 1.0, 1 / 3])
    with pytest.raises(ValueError, match="no images"):
        pooling.template_rows(np.array([4, 5]))


@pytest.mark.parametrize("seed", range(6))
def test_roc_curve_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    labels = (rng.random(n) < 0.3).astype(np.int8)
    # Coarse scores make many ties and collinear runs, which drop_intermediate must handle exactly.
    scores = np.round(rng.standard_normal(n) + labels * 1.5, int(rng.integers(0, 3)))
    fpr, tpr, thresholds = roc_curve(labels, scores)
    bf_fpr, bf_tpr, bf_thresholds = brute_force_roc(labels, scores)
    np.testing.assert_array_equal(thresholds, bf_thresholds)
    np.testing.assert_allclose(fpr, bf_fpr)
    np.testing.assert_allclose(tpr, bf_tpr)
    full_fpr, full_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert len(full_fpr) == len(np.unique(scores)) + 1 >= len(fpr)
    for x in metrics.FAR_LEVELS + (0.05, 0.3):
        assert tar_at_far(fpr, tpr, [x])[metrics.far_key(x)] == nearest_tar(bf_fpr, bf_tpr, x)


def test_roc_curve_known_small_case():
    # sklearn's documented example: roc_curve([1,1,2,2] as 0/1, [.1,.4,.35,.8]).
    fpr, tpr, thresholds = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_tar_at_far_tie_takes_higher_tpr():
    # Two points equally far from 1e-2 after flipping: the reference keeps the first (flipped) = higher TPR.
    fpr = np.array([0.0, 0.005, 0.015, 1.0])
    tpr = np.array([0.0, 0.6, 0.7, 1.0])
    assert tar_at_far(fpr, tpr, [0.01]) == {"0.01": 0.7}
    assert list(tar_at_far(fpr, tpr)) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]


def test_format_table():
    table = metrics.tar_table([("m N1D1F1", {k: v for k, v in zip(map(metrics.far_key, metrics.FAR_LEVELS), [0.8829, 0.94, 0.96071, 0.97, 0.98, 0.99])})])
    assert table.splitlines()[0] == "| Methods | 1e-06 | 1e-05 | 0.0001 | 0.001 | 0.01 | 0.1 |"
    assert table.splitlines()[2] == "| m N1D1F1 | 88.29 | 94.00 | 96.07 | 97.00 | 98.00 | 99.00 |"


def write_meta(root: Path, target, names, templates, medias, landmarks, faceness, t1, t2, labels) -> None:
    meta = root / "meta"
    meta.mkdir(parents=True)
    prefix = target.lower()
    (meta / f"{prefix}_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias)))
    (meta / f"{prefix}_name_5pts_score.txt").write_text(
        "".join(f"{n} " + " ".join(f"{v:.3f}" for v in lmk.reshape(-1)) + f" {s:.4f}\n" for n, lmk, s in zip(names, landmarks, faceness))
    )
    (meta / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in zip(t1, t2, labels)))


@pytest.mark.parametrize("target", ["IJBC", "IJBB"])
def test_read_layout_round_trip_and_errors(tmp_path, target):
    rng = np.random.default_rng(0)
    names = [f"{i}.jpg" for i in range(1, 8)]
    templates, medias = [5, 5, 5, 9, 9, 12, 12], [1, 1, 2, 3, 3, 4, 5]
    landmarks = rng.uniform(0, 100, (7, 5, 2)).astype(np.float32)
    faceness = rng.uniform(0, 1, 7).astype(np.float32)
    write_meta(tmp_path, target, names, templates, medias, landmarks, faceness, [5, 5], [9, 12], [1, 0])
    layout = ijbc_layout.read_ijb_layout(tmp_path, target)
    assert list(layout.image_names) == names
    np.testing.assert_array_equal(layout.templates, templates)
    np.testing.assert_array_equal(layout.medias, medias)
    np.testing.assert_allclose(layout.landmarks, landmarks, atol=1e-3)
    np.testing.assert_allclose(layout.faceness, faceness, atol=1e-4)
    assert layout.labels.dtype == np.int8 and list(layout.labels) == [1, 0]
    assert layout.image_paths(0, 1) == [str(tmp_path / "loose_crop" / "1.jpg")]

    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid" if target == "IJBC" else "ijbc_face_tid_mid"):
        ijbc_layout.read_ijb_layout(tmp_path, "IJBB" if target == "IJBC" else "IJBC")
    pairs = tmp_path / "meta" / f"{target.lower()}_template_pair_label.txt"
    pairs.write_text("5 77 1\n")
    with pytest.raises(ValueError, match="no images"):
        ijbc_layout.read_ijb_layout(tmp_path, target)
    pairs.write_text("5 9 2\n")
    with pytest.raises(ValueError, match="0 or 1"):
        ijbc_layout.read_ijb_layout(tmp_path, target)
    lmk = tmp_path / "meta" / f"{target.lower()}_name_5pts_score.txt"
    lines = lmk.read_text().splitlines()
    lmk.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="same order"):
        ijbc_layout.read_ijb_layout(tmp_path, target)
    with pytest.raises(ValueError, match="unknown target"):
        ijbc_layout.read_ijb_layout(tmp_path, "IJBA")


def test_feature_cache_resume_and_key_check(tmp_path):
    key = {"model": "m", "detector": "given"}
    cache = FeatureCache(tmp_path / "c", key, num_images=10, shard_size=4)
    assert cache.num_shards == 3 and cache.missing_shards() == [0, 1, 2]
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 2, 3)).astype(np.float32)
    cache.write_shard(1, feats[4:8], np.ones(4), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="must hold 2 images"):
        cache.write_shard(2, feats[8:], np.ones(3), np.zeros(3, np.uint8))
    reopened = FeatureCache(tmp_path / "c", key, num_images=10, shard_size=99)
    assert reopened.shard_size == 4 and reopened.missing_shards() == [0, 2]
    with pytest.raises(ValueError, match="incomplete"):
        list(reopened.iter_shards())
    for k in (0, 2):
        s, e = reopened.shard_range(k)
        reopened.write_shard(k, feats[s:e], np.full(e - s, 0.5), np.full(e - s, 1, np.uint8))
    got = list(reopened.iter_shards())
    assert [start for start, *_ in got] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([f for _, f, _, _ in got]), feats)
    assert list(reopened.flags()) == [1] * 4 + [0] * 4 + [1] * 2
    assert not list((tmp_path / "c").glob("*.tmp*"))
    with pytest.raises(ValueError, match="was made for"):
        FeatureCache(tmp_path / "c", {"model": "other"}, num_images=10)


class FlipSensitiveEmbedder(PairEmbedding):
    """A real (deterministic, non-trivial) function of the pixels: mean BGR of the left and right halves."""

    name = "halves"
    embedding_size = 6

    def embed(self, crops: np.ndarray, flip: bool = True) -> np.ndarray:
        half = crops.shape[2] // 2
        out = np.concatenate([crops[:, :, :half].mean(axis=(1, 2)), crops[:, :, half:].mean(axis=(1, 2))], axis=1)
        return out.astype(np.float32)


def test_extract_batch_aligns_flips_and_flags_unreadable(tmp_path):
    import cv2

    from facepipe.alignment import norm_crop

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (150, 130, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    lmk = np.array([[40, 50], [90, 50], [65, 75], [45, 100], [85, 100]], np.float32)
    with pytest.warns(UserWarning, match="unreadable"):
        out = ijbc_features.extract_batch([str(tmp_path / "a.png"), str(tmp_path / "b.jpg")], np.stack([lmk, lmk]), np.array([0.9, 0.8]), FlipSensitiveEmbedder())
    crop = norm_crop(image, lmk, 112)
    embedder = FlipSensitiveEmbedder()
    np.testing.assert_allclose(out["features"][0, 0], embedder.embed(crop[None])[0], rtol=1e-6)
    np.testing.assert_allclose(out["features"][0, 1], embedder.embed(crop[None, :, ::-1])[0], rtol=1e-6)
    assert not np.allclose(out["features"][0, 0], out["features"][0, 1])
    assert np.all(out["features"][1] == 0)
    assert list(out["flag"]) == [ijbc_features.FLAG_OK, ijbc_features.FLAG_UNREADABLE]
    np.testing.assert_allclose(out["score"], [0.9, 0.8])


def test_match_detection_picks_nearest_and_rejects_other_faces():
    from facepipe.types import Face

    given = np.array([[40, 50], [90, 50], [65, 75], [45, 100], [85, 100]], np.float32)
    near = Face(box=[20, 20, 110, 130], score=0.7, landmarks=given + 3)
    far = Face(box=[200, 20, 290, 130], score=0.99, landmarks=given + [180, 0])
    assert ijbc_features.match_detection([far, near], given) is near
    assert ijbc_features.match_detection([far], given) is None
    assert ijbc_features.match_detection([], given) is None


class FixedDetector:
    """Reports one face at fixed coordinates of whatever image it is given, to test the border bookkeeping."""

    name = "fixed"

    def __init__(self):
        self.shapes = []

    def detect(self, images):
        from facepipe.types import Face

        self.shapes += [image.shape for image in images]
        landmarks = np.array([[70, 80], [120, 80], [95, 105], [75, 130], [115, 130]], np.float32)
        return [[Face(box=[50, 50, 140, 160], score=0.75, landmarks=landmarks)] for _ in images]


def test_extract_batch_redetects_on_padded_crop(tmp_path):
    import cv2

    from facepipe.alignment import norm_crop

    image = np.random.default_rng(2).integers(0, 255, (150, 130, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    detector = FixedDetector()
    given = np.array([[40, 50], [90, 50], [65, 75], [45, 100], [85, 100]], np.float32)
    out = ijbc_features.extract_batch([str(tmp_path / "a.png")], given[None], np.array([0.9]), FlipSensitiveEmbedder(), detector, detector_pad=0.2)
    assert detector.shapes == [(150 + 60, 130 + 60, 3)]  # border 0.2 x 150 = 30 px each side
    # The detected points, shifted back by the border, are the given ones + (0, 0): same crop, detector score.
    np.testing.assert_allclose(out["features"][0, 0], FlipSensitiveEmbedder().embed(norm_crop(image, given, 112)[None])[0], rtol=1e-6)
    assert out["score"][0] == pytest.approx(0.75) and out["flag"][0] == ijbc_features.FLAG_OK
    far_given = given + 60  # the only detection is now far from the given face: fall back, keep given score
    out = ijbc_features.extract_batch([str(tmp_path / "a.png")], far_given[None], np.array([0.9]), FlipSensitiveEmbedder(), detector, detector_pad=0.2)
    assert out["flag"][0] == ijbc_features.FLAG_DETECTOR_FALLBACK and out["score"][0] == pytest.approx(0.9)


def test_feature_extractor_pickles_without_models():
    extractor = ijbc_features.FeatureExtractor(model="mobilefacenet", detector="retinaface")
    extractor._models = (object(), object())
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone._models is None and clone.model == "mobilefacenet" and clone.detector == "retinaface"


def test_write_report(tmp_path):
    result = ijbc.ConfigResult("m N1D1F1", {"code": "N1D1F1"}, {metrics.far_key(x): 0.5 for x in metrics.FAR_LEVELS}, np.array([0, 0.5, 1.0]), np.array([0, 0.7, 1.0]))
    paths = ijbc.write_report([result], tmp_path)
    assert json.loads(paths["json"].read_text()) == [{"TAR@FAR": result.tar_at_far, "config": {"code": "N1D1F1"}}]
    assert json.loads((tmp_path / "m_N1D1F1.json").read_text())["TAR@FAR"]["1e-06"] == 0.5
    assert paths["roc"].stat().st_size > 1000 and paths["roc"].read_bytes()[:4] == b"\x89PNG"
    assert "| m N1D1F1 | 50.00 |" in paths["table"].read_text()
