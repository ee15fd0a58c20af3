"""verification_runs as a library: library errors (no click), and the accumulating comparison table."""

from __future__ import annotations

import json

import pytest

from facepipe.evaluation.verification_runs import (
    ComparisonTable,
    VerificationRunError,
    block_title,
    check_pair_count,
    evaluate_bin,
)


def test_bad_bin_and_too_few_pairs_raise_library_errors(tmp_path):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    with pytest.raises(VerificationRunError, match="refusing to load global 'os.system'"):
        evaluate_bin(evil, embedder=None)
    with pytest.raises(VerificationRunError, match="CFP-FF: 1 pair\\(s\\) selected; the protocol needs at least 2"):
        check_pair_count("CFP-FF", [("a", "b")])


def test_block_titles_name_benchmark_detector_and_model():
    assert block_title("CFP-FP", "mobilefacenet", "mtcnn") == "== CFP-FP · detector mtcnn · model mobilefacenet =="
    assert block_title("lfw", "iresnet50", None) == "== lfw · released crops (no detector) · model iresnet50 =="


def cell(acc):
    return {"acc": acc, "std": 0.01, "images": {"fallback": 0, "images": 10}}


def test_comparison_table_accumulates_rows_and_columns(tmp_path):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    table = ComparisonTable.load(js)
    row = lambda det, model, results: {"key": ComparisonTable.row_key(det, model, None), "method": f"{det} + {model}",
                                       "detector": det, "model": model, "weights": None, "results": results}
    table.add(["CFP-FP"], [row("mtcnn", "m", {"CFP-FP": cell(0.9)})], {"call": 1})
    table.write(md, js)
    table = ComparisonTable.load(js)
    table.add(["LFW", "CFP-FP"], [row("retinaface", "m", {"LFW": cell(0.99), "CFP-FP": cell(0.95)})], {"call": 2})
    table.write(md, js)
    lines = md.read_text().splitlines()
    assert lines[0] == "| Method | LFW | CFP-FP |"
    assert lines[2] == "| retinaface + m | 99.00 ± 1.00 | 95.00 ± 1.00 |" and lines[3] == "| mtcnn + m | - | 90.00 ± 1.00 |"
    table = ComparisonTable.load(js)
    table.add(["CFP-FP"], [row("mtcnn", "m", {"CFP-FP": cell(0.8)})], {"call": 3})  # a rerun replaces its row
    table.write(md, js)
    data = json.loads(js.read_text())
    assert [r["detector"] for r in data["rows"]] == ["mtcnn", "retinaface"] and data["columns"] == ["CFP-FP", "LFW"]
    assert data["rows"][0]["results"]["CFP-FP"]["acc"] == 0.8 and data["meta"] == {"call": 3}
    js.write_text("[1, 2]")
    with pytest.raises(VerificationRunError, match="not a comparison table"):
        ComparisonTable.load(js)
