"""``facepipe audit --against`` an IJB-C layout root: a mini IJB-C built from CFP, embedded on the fly with the
training folder's model; overlap found for the subjects the training set shares, none for the others."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from tests.conftest import shared_path

pytestmark = pytest.mark.shared

TRAINING = ["004", "005", "006", "007", "008", "009"]  # CFP identities of the training set
IJB_SUBJECTS = 5  # the mini IJB-C takes CFP 001..005 as subjects 1..5: subjects 4 and 5 are in both


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from facepipe.alignment import align_faces
    from facepipe.detection import create_detector
    from facepipe.evaluation.ijbc_mini import build_mini_ijbc
    from facepipe.io.images import read_image

    cfp = shared_path("cfp", "cfp-dataset")
    root = tmp_path_factory.mktemp("audit_ijbc")
    detector = create_detector("retinaface")
    for identity in TRAINING:
        (root / "aligned" / identity).mkdir(parents=True)
        images = [read_image(cfp / "Data" / "Images" / identity / "frontal" / f"{i:02d}.jpg") for i in range(1, 6)]
        faces = [[max(found, key=lambda f: f.area)] for found in detector.detect(images)]
        for i, crops in enumerate(align_faces(images, faces), start=1):
            cv2.imwrite(str(root / "aligned" / identity / f"{i:02d}.png"), crops[0])
    result = CliRunner().invoke(main, ["embed", str(root / "aligned"), "--out", str(root / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    build_mini_ijbc(cfp, root / "IJBC", detector, num_subjects=IJB_SUBJECTS, seed=1, progress=False)
    return root


def _audit(*args: str):
    return CliRunner().invoke(main, ["audit", *args])


def test_overlap_with_an_ijbc_root_names_the_shared_subjects(sets):
    from facepipe.audit.data import load_embedding_folder
    from facepipe.evaluation.ijbc_layout import read_ijb_layout

    out = sets / "out"
    result = _audit(str(sets / "emb"), "--against", str(sets / "IJBC"), "--out", str(out))
    assert result.exit_code == 0, result.output
    overlap = pd.read_csv(out / "overlap.csv", dtype={"identity": str, "other": str})
    assert len(overlap) == IJB_SUBJECTS and set(overlap["against"]) == {"IJBC (IJBC)"}
    flagged = overlap.loc[overlap["flagged"]]
    assert dict(zip(flagged["other"], flagged["identity"])) == {"4": "004", "5": "005"}
    assert overlap.loc[~overlap["flagged"], "other"].tolist() and set(overlap.loc[~overlap["flagged"], "other"]) == {"1", "2", "3"}
    summary = json.loads((out / "summary.json").read_text())
    layout = read_ijb_layout(sets / "IJBC", "IJBC")
    assert summary["against"] == [{"name": "IJBC (IJBC)", "images": layout.num_images, "identities": IJB_SUBJECTS,
                                   "skipped": {"unreadable_images": 0, "no_subject": 0, "non_finite": 0, "zero_vectors": 0}}]
    # the same model: a shared subject's IJB-C image of a training photo embeds as that photo's crop did
    train = load_embedding_folder(sets / "emb")
    shared = train.vectors[np.array([p.startswith("004/") for p in train.paths])]
    caches = list((out / "ijb_feature_cache").glob("IJBC_mobilefacenet_given_*"))
    assert len(caches) == 1
    features = np.concatenate([np.load(f) for f in sorted(caches[0].glob("features_*.npy"))]).sum(axis=1)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    subject_4 = features[np.isin(layout.templates, _templates_of(sets / "IJBC", 4))]
    assert (subject_4 @ shared.T).max() > 0.9  # the CFP frontal photos are in both sets
    # a second run reuses the feature cache
    again = _audit(str(sets / "emb"), "--against", str(sets / "IJBC"), "--out", str(out))
    assert again.exit_code == 0 and pd.read_csv(out / "overlap.csv", dtype={"identity": str, "other": str}).equals(overlap)


def _templates_of(root, subject: int) -> list[int]:
    tables = [pd.read_csv(path) for path in sorted((root / "meta").glob("ijbc_1N_*.csv"))]
    table = pd.concat(tables)
    return sorted(set(table.loc[table["SUBJECT_ID"] == subject, "TEMPLATE_ID"]))


def test_without_1n_files_templates_are_the_identities(sets, tmp_path):
    ijbc = tmp_path / "IJBC"
    shutil.copytree(sets / "IJBC", ijbc, symlinks=True)
    for path in (ijbc / "meta").glob("ijbc_1N_*.csv"):
        path.unlink()
    result = _audit(str(sets / "emb"), "--against", str(ijbc), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    overlap = pd.read_csv(tmp_path / "out" / "overlap.csv", dtype={"identity": str, "other": str})
    assert len(overlap) == 3 * IJB_SUBJECTS and overlap["other"].str.startswith("template ").all()
    flagged = set(overlap.loc[overlap["flagged"], "identity"])
    assert flagged <= {"004", "005"} and flagged


def _with_model(sets, tmp_path, **changes):
    """A copy of the training embedding folder whose run.json names another model."""
    emb = tmp_path / "emb"
    shutil.copytree(sets / "emb", emb)
    run = json.loads((emb / "run.json").read_text())
    (emb / "run.json").write_text(json.dumps({**run, **changes}))
    return emb


def test_a_model_that_cannot_be_rebuilt_or_another_dimension_is_one_line(sets, tmp_path):
    missing = _with_model(sets, tmp_path / "a", weights=str(tmp_path / "gone.pt"))
    result = _audit(str(missing), "--against", str(sets / "IJBC"), "--out", str(tmp_path / "o1"))
    assert result.exit_code == 1 and "gone.pt (named in its run.json) are not there" in result.output
    unknown = _with_model(sets, tmp_path / "b", model="resnet9000", weights=None)
    result = _audit(str(unknown), "--against", str(sets / "IJBC"), "--out", str(tmp_path / "o2"))
    assert result.exit_code == 1 and "cannot rebuild the training set's model 'resnet9000'" in result.output
    wider = _with_model(sets, tmp_path / "c", model="onnx", options={"preset": "faceplugin"},
                        weights=str(shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")))
    result = _audit(str(wider), "--against", str(sets / "IJBC"), "--out", str(tmp_path / "o3"))
    assert result.exit_code == 1 and "512-d embeddings, the training set's are 128-d" in result.output
    for output in (result.output,):
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1
