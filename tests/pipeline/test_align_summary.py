"""The align end-of-run summary says how many detected faces ``--keep`` left out (group photos)."""

from __future__ import annotations

import shutil

from facepipe.pipeline.align import AlignConfig, run_align
from facepipe.pipeline.manifest import read_manifest
from facepipe.pipeline.sources import directory_source
from tests.conftest import shared_path


def test_summary_counts_the_faces_keep_left_out(tmp_path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(shared_path("images", "group", "t1.jpg"), source / "t1.jpg")
    shutil.copy(shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", "01.jpg"), source / "single.jpg")

    largest = run_align(AlignConfig(keep="largest"), directory_source(source), tmp_path / "largest", workers=0, progress=False)
    rows = {row.key: row for row in read_manifest(largest.manifest_path)}
    detected = rows["t1.jpg"].num_detected
    assert detected > 5 and len(rows["t1.jpg"].outputs) == 1
    assert rows["single.jpg"].num_detected == len(rows["single.jpg"].outputs) == 1
    assert largest.faces_not_kept() == (detected - 1, 1)
    assert f"{detected - 1} detected faces not kept (--keep) in 1 images" in largest.format()

    everyone = run_align(AlignConfig(keep="all"), directory_source(source), tmp_path / "all", workers=0, progress=False)
    assert everyone.faces_not_kept() == (0, 0)
    assert everyone.crops_written == detected + 1
