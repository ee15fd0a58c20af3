import json

import numpy as np
import pytest

from facepipe.embedding.store import EmbeddedBatch, EmbeddingStore, shard_rows
from facepipe.index import Gallery, GalleryError, IndexParams, build_gallery, recall_at_k


def write_embedding_dir(path, vectors, identities, status=None, model="mobilefacenet", shard_size=500):
    """An embedding folder in the `facepipe embed` layout, from given vectors."""
    store = EmbeddingStore(path)
    store.start({"model": model, "weights": None, "flip": True, "normalize": True, "dtype": "float32", "options": {}})
    status = status or ["ok"] * len(vectors)
    for shard, start in enumerate(range(0, len(vectors), shard_size)):
        part = slice(start, start + shard_size)
        paths = [f"{identities[i]}/{i}.jpg" for i in range(start, min(start + shard_size, len(vectors)))]
        norms = np.linalg.norm(vectors[part], axis=1).astype(np.float32)
        batch = EmbeddedBatch(vectors[part].astype(np.float32), norms, status[part], [""] * len(paths))
        store.commit_shard(shard, batch.embeddings, shard_rows(shard, start, paths, batch, {}))
    store.merge()
    return path


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """300 identities x 4 samples around identity centres in 64-d: neighbours are mostly same-identity."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, 64))
    identities = np.repeat(np.arange(300), 4)
    vectors = centres[identities] + 0.6 * rng.standard_normal((1200, 64))
    names = [f"id{i:03d}" for i in identities]
    root = tmp_path_factory.mktemp("emb")
    return write_embedding_dir(root / "emb", vectors, names), vectors, names


def test_recall_at_k_counts_overlaps():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[1, 3, 9], [7, 8, 4]])
    assert recall_at_k(exact, approx, 1) == pytest.approx(0.5)
    assert recall_at_k(exact, approx, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_flat_gallery_round_trip(tmp_path, clustered):
    emb_dir, vectors, names = clustered
    info = build_gallery([emb_dir], tmp_path / "g.faiss", IndexParams("flat"), progress=False)
    assert (info.count, info.dim, info.recall) == (1200, 64, {})
    assert info.spec["model"] == "mobilefacenet"
    gallery = Gallery(tmp_path / "g.faiss")
    scores, ids = gallery.search(vectors[[0, 599, 1199]], k=4)
    assert ids[:, 0].tolist() == [0, 599, 1199]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    table = gallery.results_table(["a", "b", "c"], scores, ids)
    assert len(table) == 12 and table.loc[0, "path"] == f"{names[0]}/0.jpg" and table.loc[0, "identity"] == names[0]
    same = (table.groupby("query")["identity"].apply(lambda s: (s == s.iloc[0]).sum())).tolist()
    assert all(n == 4 for n in same)  # the other three samples of each identity are its nearest neighbours
    with pytest.raises(GalleryError, match="32-d"):
        gallery.search(np.zeros((1, 32), dtype=np.float32))


@pytest.mark.parametrize("index_type", ["hnsw", "ivfflat", "ivfpq"])
def test_approximate_galleries_report_recall_against_flat(tmp_path, clustered, index_type):
    emb_dir, vectors, _ = clustered
    info = build_gallery([emb_dir], tmp_path / "g.faiss", IndexParams(index_type), recall_queries=200, progress=False)
    assert 150 <= info.recall["queries"] <= 260
    assert 0.0 < info.recall["recall@1"] <= 1.0 and 0.0 < info.recall["recall@10"] <= 1.0
    stored = json.loads((tmp_path / "g.faiss.json").read_text())
    assert stored["recall"] == info.recall and stored["params"]["index_type"] == index_type
    if index_type == "hnsw":
        assert info.recall["recall@1"] > 0.9
    if index_type == "ivfflat":  # visiting every cell is exhaustive search: recall must be exactly 1
        exhaustive = build_gallery(
            [emb_dir], tmp_path / "all.faiss", IndexParams("ivfflat", nlist=8, nprobe=8), recall_queries=200, progress=False
        )
        assert exhaustive.recall["recall@1"] == 1.0 and exhaustive.recall["recall@10"] == 1.0
    gallery = Gallery(tmp_path / "g.faiss")
    _, ids = gallery.search(vectors[:20], k=1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.5


def test_unusable_rows_are_left_out_and_ids_map_back(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6, 16))
    status = ["ok", "error", "ok", "ok", "error", "ok"]
    emb_dir = write_embedding_dir(tmp_path / "emb", vectors, list("abcdef"), status=status, shard_size=4)
    info = build_gallery([emb_dir], tmp_path / "g.faiss", progress=False)
    assert info.count == 4
    gallery = Gallery(tmp_path / "g.faiss")
    assert gallery.mapping["path"].tolist() == ["a/0.jpg", "c/2.jpg", "d/3.jpg", "f/5.jpg"]
    _, ids = gallery.search(vectors[5], k=1)
    assert gallery.mapping.loc[int(ids[0, 0]), "identity"] == "f"


def test_several_folders_must_share_a_model(tmp_path):
    rng = np.random.default_rng(2)
    a = write_embedding_dir(tmp_path / "a", rng.standard_normal((3, 8)), list("xyz"))
    b = write_embedding_dir(tmp_path / "b", rng.standard_normal((3, 8)), list("xyz"))
    info = build_gallery([a, b], tmp_path / "ab.faiss", progress=False)
    assert info.count == 6
    assert Gallery(tmp_path / "ab.faiss").mapping["source"].nunique() == 2
    c = write_embedding_dir(tmp_path / "c", rng.standard_normal((3, 8)), list("xyz"), model="iresnet50")
    with pytest.raises(GalleryError, match="different models"):
        build_gallery([a, c], tmp_path / "ac.faiss", progress=False)


def test_missing_or_incomplete_galleries_are_reported(tmp_path, clustered):
    with pytest.raises(GalleryError, match="gallery file missing"):
        Gallery(tmp_path / "nothing.faiss")
    emb_dir, _, _ = clustered
    build_gallery([emb_dir], tmp_path / "g.faiss", progress=False)
    (tmp_path / "g.faiss.parquet").unlink()
    with pytest.raises(GalleryError, match="g.faiss.parquet"):
        Gallery(tmp_path / "g.faiss")
    with pytest.raises(GalleryError, match="no manifest.parquet"):
        build_gallery([tmp_path], tmp_path / "x.faiss", progress=False)
