"""CLI round trip on real photos: facepipe align -> embed -> index build -> index search."""

import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.embedding.store import load_embeddings
from tests.conftest import shared_path

PEOPLE = ("Natalie_Portman", "Angelina_Jolie", "Tom_Hanks", "Brad_Pitt", "Johnny_Depp")


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = shared_path("images", "celebrities")
    table = pd.read_csv(root / "identities.csv")
    work = tmp_path_factory.mktemp("cli")
    for name, identity in zip(table["file"], table["identity"]):
        if identity in PEOPLE:
            (work / "photos" / identity).mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, work / "photos" / identity / name.replace(" ", "_"))
    result = invoke("align", work / "photos", "--out", work / "aligned", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    result = invoke("embed", work / "aligned", "--out", work / "emb", "--shard-size", "5", "--batch-size", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    return work, root


def test_embed_writes_identities_and_carries_detector_scores(pipeline):
    work, _ = pipeline
    matrix, manifest = load_embeddings(work / "emb")
    assert len(manifest) == 14 and matrix.shape == (14, 128)
    assert set(manifest["identity"]) == set(PEOPLE)
    assert (manifest["status"] == "ok").all()
    assert manifest["det_score"].between(0.5, 1.0).all()  # from aligned/manifest.parquet
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    again = invoke("embed", work / "aligned", "--out", work / "emb", "--shard-size", "5", "--no-progress")
    assert again.exit_code == 0 and "0 embedded now" in again.output and "14 from finished shards" in again.output


def test_build_and_search_with_an_image_an_aligned_folder_and_an_embedding_folder(pipeline):
    work, root = pipeline
    result = invoke("index", "build", work / "emb", "--out", work / "gallery.faiss", "--no-progress")
    assert result.exit_code == 0 and "14 faces, 128-d, flat" in result.output
    result = invoke("index", "search", work / "gallery.faiss", root / "Tom Hanks.jpg", "--k", "2", "--out", work / "img.csv")
    assert result.exit_code == 0, result.output
    hits = pd.read_csv(work / "img.csv")
    best_face = hits[hits["query"] == "Tom Hanks.jpg#0"]
    assert best_face["identity"].tolist() == ["Tom_Hanks", "Tom_Hanks"]  # the photo itself, then his other photo
    assert best_face["score"].iloc[0] > 0.99 and best_face["score"].iloc[1] > 0.5
    for query in (work / "aligned", work / "emb"):
        out = work / f"{query.name}.parquet"
        result = invoke("index", "search", work / "gallery.faiss", query, "--k", "2", "--out", out)
        assert result.exit_code == 0, result.output
        hits = pd.read_parquet(out)
        assert hits["query"].nunique() == 14
        first = hits[hits["rank"] == 1]
        assert (first["query"] == first["path"]).all() and (first["score"] > 0.99).all()  # itself
        second = hits[hits["rank"] == 2]
        truth = second["query"].str.split("/").str[0]
        assert (second["identity"] == truth).mean() >= 0.9  # nearest other face is the same person


def test_approximate_build_prints_recall(pipeline):
    work, _ = pipeline
    result = invoke("index", "build", work / "emb", "--out", work / "hnsw.faiss", "--type", "hnsw", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "recall vs exact flat search on 14 gallery queries: recall@1 1.0000, recall@10 1.0000" in result.output


def test_clear_errors(pipeline, tmp_path):
    work, _ = pipeline
    result = invoke("embed", work / "aligned", "--out", tmp_path / "x", "--model", "iresnet50")
    assert result.exit_code == 1 and "needs weights" in result.output
    result = invoke("embed", work / "aligned", "--out", tmp_path / "x", "--mean", "127")
    assert result.exit_code == 2 and "only apply to --model onnx" in result.output
    result = invoke("embed", work / "aligned", "--out", work / "emb", "--no-flip", "--no-progress")
    assert result.exit_code == 1 and "other settings" in result.output
    result = invoke("index", "search", work / "gallery.faiss", work / "aligned", "--out", tmp_path / "r.txt")
    assert result.exit_code == 2 and ".csv or .parquet" in result.output


def test_models_lists_the_embedders_with_their_contract():
    result = invoke("models", "--kind", "embedder")
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert {"mobilefacenet", "iresnet18", "iresnet50", "iresnet100", "iresnet200"} <= set(lines)
    assert "RGB" in lines["mobilefacenet"] and "127.5" in lines["mobilefacenet"] and "128" in lines["mobilefacenet"]
    assert "mobilefacenet_foamliu.pt" in lines["mobilefacenet"] and "512" in lines["iresnet100"]
