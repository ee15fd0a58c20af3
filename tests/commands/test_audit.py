"""``facepipe audit`` end to end on real CFP crops with injected faults, and its report in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import cv2
import pandas as pd
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from tests.conftest import shared_path

IDENTITIES = ["001", "002", "003", "004", "005", "006", "007", "008"]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Aligned crops of 8 CFP identities (6 frontal each) with one misfiled image, one identity split under two
    names, one re-encoded copy, one unreadable crop and one single-image identity; embedded and audited."""
    from facepipe.alignment import align_faces
    from facepipe.detection import create_detector
    from facepipe.io.images import read_image

    images_root = shared_path("cfp", "cfp-dataset", "Data", "Images")
    root = tmp_path_factory.mktemp("audit")
    aligned = root / "aligned"
    detector = create_detector("retinaface")
    for identity in IDENTITIES:
        (aligned / identity).mkdir(parents=True)
        images = [read_image(images_root / identity / "frontal" / f"{i:02d}.jpg") for i in range(1, 7)]
        faces = [[max(found, key=lambda f: f.area)] for found in detector.detect(images)]
        for i, crops in enumerate(align_faces(images, faces), start=1):
            cv2.imwrite(str(aligned / identity / f"{i:02d}.png"), crops[0])
    shutil.move(aligned / "001" / "06.png", aligned / "002" / "moved.png")  # label noise
    (aligned / "004b").mkdir()
    for name in ("02.png", "04.png", "06.png"):  # one person under two names
        shutil.move(aligned / "004" / name, aligned / "004b" / name)
    crop = cv2.imread(str(aligned / "003" / "01.png"))
    smaller = cv2.resize(cv2.resize(crop, (80, 80), interpolation=cv2.INTER_AREA), (112, 112))
    cv2.imwrite(str(aligned / "003" / "01_copy.jpg"), smaller, [cv2.IMWRITE_JPEG_QUALITY, 70])  # re-encoded copy
    (aligned / "005" / "broken.png").write_bytes(b"not an image")  # an error row
    (aligned / "lonely").mkdir()
    shutil.copy(aligned / "007" / "01.png", aligned / "lonely" / "01.png")  # a single-image identity
    runner = CliRunner()
    result = runner.invoke(main, ["embed", str(aligned), "--out", str(root / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["audit", str(root / "emb"), "--out", str(root / "out"), "--write-clean", str(root / "clean.txt")])
    assert result.exit_code == 0, result.output
    return root, result.output


def _flagged(root, name):
    table = pd.read_csv(root / "out" / f"{name}.csv")
    return table.loc[table["flagged"]]


def test_each_injected_fault_is_flagged_and_counted(audited):
    root, output = audited
    noise = pd.read_csv(root / "out" / "label_noise.csv")
    assert noise["path"][0] == "002/moved.png" and noise["flagged"][0]  # the most suspicious, flagged
    assert noise["best_other_identity"][0] == "001"  # where it belongs
    assert noise["flagged"].sum() <= 3  # a hard genuine crop may be flagged for review in a set this small
    duplicates = {tuple(sorted(p)) for p in _flagged(root, "duplicate_identities")[["identity_a", "identity_b"]].itertuples(index=False)}
    assert ("004", "004b") in duplicates and ("007", "lonely") in duplicates and len(duplicates) == 2
    copies = {tuple(sorted(p)) for p in _flagged(root, "near_duplicates")[["path_a", "path_b"]].itertuples(index=False)}
    assert ("003/01.png", "003/01_copy.jpg") in copies
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["skipped"]["error_rows"] == 1 and summary["single_image_identities"] == 1
    clean = (root / "clean.txt").read_text().split()
    assert "002/moved.png" not in clean and "003/01.png" in clean and "003/01_copy.jpg" not in clean
    assert len(clean) == summary["images"] - summary["flagged"]["label_noise"] - summary["flagged"]["near_duplicates"]
    for name in ("label_noise", "duplicate_identities", "near_duplicates", "overlap"):
        assert pd.read_parquet(root / "out" / f"{name}.parquet").shape == pd.read_csv(root / "out" / f"{name}.csv").shape
    assert f"label_noise            {summary['flagged']['label_noise']} flagged" in output


def test_report_renders_in_headless_chromium(audited):
    root, _ = audited
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         (root / "out" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    body = re.search(r'<body data-images-total="(\d+)" data-images-loaded="(\d+)"', dom)
    assert body is not None, dom[:500]
    total, loaded = int(body.group(1)), int(body.group(2))
    assert total > 10 and loaded == total
    rows = dict(re.findall(r'<table class="cases" id="(\w+)" data-rows="(\d+)"', dom))
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert {name: int(n) for name, n in rows.items()} == summary["flagged"]


def test_bad_inputs_are_one_line(tmp_path, audited):
    root, _ = audited
    runner = CliRunner()
    result = runner.invoke(main, ["audit", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not a facepipe embedding folder" in result.output
    junk = tmp_path / "x.txt"
    junk.write_text("x")
    result = runner.invoke(main, ["audit", str(root / "emb"), "--against", str(junk), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--against takes an embedding folder, an IJB-C layout root or a .bin file" in result.output
    assert "Traceback" not in result.output
