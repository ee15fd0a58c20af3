import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation.protocols import read_cfp_pairs
from tests.conftest import REPO_ROOT, shared_path


def _make_cfp_bin_module():
    spec = importlib.util.spec_from_file_location("make_cfp_bin", REPO_ROOT / "eval" / "make_cfp_bin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def cfp_root():
    return shared_path("cfp", "cfp-dataset")


def test_cfp_end_to_end_equals_verify_on_a_bin_of_the_same_crops(cfp_root, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "cfp.json"
    args = ["eval", "cfp", "--root", str(cfp_root), "--protocol", "FP", "--splits", "1", "--limit", "20",
            "--detector", "retinaface", "--model", "mobilefacenet", "--batch-size", "8", "--cache-dir", str(cache),
            "--out", str(out), "--roc", str(tmp_path / "roc.png")]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "[cfp_fp]Accuracy-Flip: " in result.output and "[cfp_fp]XNorm: " in result.output
    report = json.loads(out.read_text())
    fp = report["FP"]
    assert set(report) == {"FP", "meta"}
    assert fp["n_pairs"] == 20 and fp["n_folds"] == 10
    assert fp["images"]["fallback"] == 0 and fp["images"]["images"] == len(
        read_cfp_pairs(cfp_root, "FP").subset([1], 20).unique_paths())
    # Frontal-profile pairs with a 128-d MobileFaceNet: clearly better than chance, not perfect.
    assert 0.6 <= fp["acc"] <= 1.0 and 0.7 <= fp["auc"] <= 1.0
    assert 5 < fp["xnorm"] < 40
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(cache.glob("*.npz"))) == 1

    # The same crops written losslessly to a .bin give exactly the same numbers through `eval verify`.
    bin_path = tmp_path / "cfp_fp_split1.bin"
    from facepipe.detection.base import create_detector

    _make_cfp_bin_module().build_cfp_bin(cfp_root, "FP", bin_path, create_detector("retinaface"), splits=[1],
                                         limit=20, ext=".png")
    verify_out = tmp_path / "verify.json"
    result = _invoke(["eval", "verify", "--bin", str(bin_path), "--model", "mobilefacenet", "--out", str(verify_out)])
    assert result.exit_code == 0, result.output
    verified = json.loads(verify_out.read_text())["cfp_fp_split1"]
    assert verified["acc"] == fp["acc"] and verified["std"] == fp["std"]
    assert verified["flip"]["fold_accuracies"] == fp["flip"]["fold_accuracies"]
    assert verified["xnorm"] == pytest.approx(fp["xnorm"], rel=1e-5)
    assert "[cfp_fp_split1]Accuracy-Flip: " in result.output

    # A rerun is served from the cache: no progress bar for new images, same numbers.
    result = _invoke(args)
    assert json.loads(out.read_text())["FP"]["acc"] == fp["acc"]


def test_lfw_end_to_end_on_an_lfw_layout(cfp_root, tmp_path):
    # LFW's images are not here (two samples are); build the LFW layout from the two Anthony Hopkins samples
    # and CFP frontal photos named the LFW way, and a two-set pairs file.
    lfw = shared_path("lfw")
    root = tmp_path / "lfw"
    people = {"Anthony_Hopkins": [lfw / "Anthony_Hopkins_0001.jpg", lfw / "Anthony_Hopkins_0002.jpg"]}
    for identity in ("001", "002", "003", "004"):
        people[f"Cfp_{identity}"] = sorted((cfp_root / "Data" / "Images" / identity / "frontal").glob("*.jpg"))[:3]
    for name, files in people.items():
        (root / name).mkdir(parents=True)
        for i, source in enumerate(files, 1):
            os.symlink(source, root / name / f"{name}_{i:04d}.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "2\t3\n"
        "Anthony_Hopkins\t1\t2\nCfp_001\t1\t2\nCfp_002\t1\t3\n"
        "Anthony_Hopkins\t1\tCfp_001\t1\nCfp_001\t3\tCfp_002\t2\nCfp_002\t1\tCfp_003\t1\n"
        "Cfp_003\t2\t3\nCfp_004\t1\t2\nCfp_004\t2\t3\n"
        "Cfp_003\t1\tCfp_004\t1\nCfp_004\t3\tAnthony_Hopkins\t2\nCfp_003\t3\tCfp_001\t2\n"
    )
    out = tmp_path / "lfw.json"
    result = _invoke(["eval", "lfw", "--root", str(root), "--pairs", str(pairs), "--detector", "mtcnn",
                      "--no-cache", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["LFW"]
    assert report["n_pairs"] == 12 and report["n_folds"] == 2  # the two official sets are the folds
    assert report["images"]["images"] == 14 and report["images"]["fallback"] == 0
    assert report["auc"] > 0.9  # frontal photos of 5 people: nearly separable


def test_compare_detectors_table(cfp_root, tmp_path):
    bin_path = tmp_path / "cfp_ff_mini.bin"
    from facepipe.detection.base import create_detector

    _make_cfp_bin_module().build_cfp_bin(cfp_root, "FF", bin_path, create_detector("retinaface"), splits=[2],
                                         limit=6)
    out = tmp_path / "table.md"
    result = _invoke(["eval", "compare-detectors", "--cfp", str(cfp_root), "--splits", "1", "--limit", "6",
                      "--bin", str(bin_path), "--model", "mobilefacenet", "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = out.read_text()
    assert table.splitlines()[0] == "| Method | CFP-FF | CFP-FP | cfp_ff_mini |"
    assert "| MTCNN + mobilefacenet | " in table and "| RetinaFace + mobilefacenet | " in table
    assert "| released .bin crops + mobilefacenet | - | - | " in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["columns"] == ["CFP-FF", "CFP-FP", "cfp_ff_mini"]
    assert [row["detector"] for row in data["rows"]] == ["mtcnn", "retinaface", None]
    for row in data["rows"][:2]:
        for column in data["columns"]:
            result_cell = row["results"][column]
            assert 0.0 <= result_cell["acc"] <= 1.0 and result_cell["n_pairs"] == 6
            assert f"{100 * result_cell['acc']:.2f} ± {100 * result_cell['std']:.2f}" in table
    # Four cache files: (mtcnn, retinaface) x (raw photos, re-aligned .bin crops).
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4


def test_bad_inputs_give_clear_errors(tmp_path, cfp_root):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    result = CliRunner().invoke(main, ["eval", "verify", "--bin", str(evil), "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "refusing to load global 'os.system'" in result.output
    assert not (tmp_path / "r.json").exists()
    result = CliRunner().invoke(main, ["eval", "cfp", "--root", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "not a CFP data set" in result.output
    result = CliRunner().invoke(main, ["eval", "cfp", "--root", str(cfp_root), "--splits", "11",
                                       "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "unknown fold(s) [11]" in result.output
    result = CliRunner().invoke(main, ["eval", "cfp", "--root", str(cfp_root), "--splits", "3", "--limit", "1",
                                       "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "CFP-FF: 1 pair(s) selected; the protocol needs at least 2" in result.output
    result = CliRunner().invoke(main, ["eval", "compare-detectors", "--out", str(tmp_path / "t.md")])
    assert result.exit_code != 0 and "give at least one benchmark" in result.output
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t1\nNobody\t1\t2\nNobody\t1\tSomebody\t1\n")
    result = CliRunner().invoke(main, ["eval", "lfw", "--root", str(tmp_path), "--pairs", str(pairs),
                                       "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "3 image(s) of the protocol are missing" in result.output
