import pickle
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from facepipe.embedding import create_embedder, l2_normalize
from facepipe.embedding.store import (
    CropEmbedder,
    EmbeddingStoreError,
    EmbedSpec,
    embed_directory,
    embeddings_of,
    iter_shards,
    list_crops,
    load_embeddings,
    result_schema,
)
from facepipe.io.atomic import TEMP_MARK, temporary_path
from facepipe.pipeline.sources import Item


def _write_aligned_tree(root, rng):
    """Identity folders of 112x112 crops, one undecodable file, one wrong-size crop, and an align manifest."""
    names = []
    for identity, count in (("alice", 3), ("bob", 2), ("carol", 2)):
        (root / identity).mkdir(parents=True)
        for i in range(count):
            crop = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
            cv2.imwrite(str(root / identity / f"{i}.png"), crop)
            names.append(f"{identity}/{i}.png")
    (root / "bob" / "broken.jpg").write_bytes(b"this is not a jpeg")
    cv2.imwrite(str(root / "carol" / "small.png"), np.zeros((64, 64, 3), dtype=np.uint8))
    outputs = [[n] for n in names]
    pd.DataFrame({"outputs": outputs, "scores": [[0.5 + 0.01 * i] for i in range(len(names))]}).to_parquet(root / "manifest.parquet")
    return names


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    names = _write_aligned_tree(root, np.random.default_rng(0))
    return root, names


@pytest.fixture(scope="module")
def reference(aligned):
    root, names = aligned
    embedder = create_embedder("mobilefacenet")
    crops = np.stack([cv2.imread(str(root / n)) for n in names])
    return dict(zip(names, embedder.embed(crops, flip=True)))


def test_list_crops_is_sorted_relative_and_skips_state(aligned):
    root, names = aligned
    found = list_crops(root)
    assert found == sorted(names + ["bob/broken.jpg", "carol/small.png"])


def test_embed_directory_writes_aligned_rows_with_identity_norm_and_det_score(tmp_path, aligned, reference):
    root, names = aligned
    summary = embed_directory(root, tmp_path / "emb", EmbedSpec(), shard_size=3, batch_size=2, progress=False)
    assert (summary.total, summary.embedded, summary.errors) == (9, 9, 2)
    matrix, manifest = load_embeddings(tmp_path / "emb")
    assert matrix.shape == (9, 128) and matrix.dtype == np.float32
    assert manifest["index"].tolist() == list(range(9))
    assert manifest["shard"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    by_path = manifest.set_index("path")
    for name in names:
        row = by_path.loc[name]
        assert row["status"] == "ok" and row["identity"] == name.split("/")[0]
        np.testing.assert_allclose(matrix[int(row["index"])], l2_normalize(reference[name]), atol=1e-4)
        np.testing.assert_allclose(row["norm"], np.linalg.norm(reference[name]), rtol=1e-4)
        assert row["det_score"] == pytest.approx(0.5 + 0.01 * names.index(name), abs=1e-6)
    for bad, reason in (("bob/broken.jpg", "decodable"), ("carol/small.png", "64x64")):
        row = by_path.loc[bad]
        assert row["status"] == "error" and reason in row["reason"] and np.isnan(row["det_score"])
        assert not matrix[int(row["index"])].any()
    chunks = list(iter_shards(tmp_path / "emb"))
    assert [len(m) for m, _ in chunks] == [3, 3, 3] and isinstance(chunks[0][0], np.memmap)


def test_raw_float16_keeps_the_norm(tmp_path, aligned, reference):
    root, names = aligned
    embed_directory(root, tmp_path / "emb", EmbedSpec(normalize=False, dtype="float16", flip=True), progress=False)
    matrix, manifest = load_embeddings(tmp_path / "emb")
    assert matrix.dtype == np.float16
    row = int(manifest.set_index("path").loc[names[0], "index"])
    np.testing.assert_allclose(matrix[row].astype(np.float32), reference[names[0]], rtol=2e-3, atol=2e-3)


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(tmp_path, aligned, monkeypatch):
    root, _ = aligned
    spec = EmbedSpec()
    embed_directory(root, tmp_path / "full", spec, shard_size=2, progress=False)
    calls = {"n": 0}
    original = CropEmbedder.embed_items

    def crash_on_third_batch(self, items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, items)

    monkeypatch.setattr(CropEmbedder, "embed_items", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_directory(root, tmp_path / "resumed", spec, shard_size=2, batch_size=2, progress=False)
    shards = tmp_path / "resumed" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [
        "emb-000000.npy", "emb-000000.parquet", "emb-000001.npy", "emb-000001.parquet"
    ]
    temporary_path(shards / "emb-000002.npy").write_bytes(b"half-written")  # what a kill during a write leaves
    (shards / "emb-000003.npy").write_bytes(b"a matrix whose marker a kill prevented")
    monkeypatch.setattr(CropEmbedder, "embed_items", original)
    summary = embed_directory(root, tmp_path / "resumed", spec, shard_size=2, batch_size=2, progress=False)
    assert summary.embedded == 9 - 4
    assert not [p for p in shards.iterdir() if TEMP_MARK in p.name]
    full, full_manifest = load_embeddings(tmp_path / "full")
    resumed, resumed_manifest = load_embeddings(tmp_path / "resumed")
    np.testing.assert_allclose(resumed, full, atol=1e-5)
    pd.testing.assert_frame_equal(resumed_manifest, full_manifest)


def test_resume_with_other_settings_is_refused(tmp_path, aligned):
    root, _ = aligned
    embed_directory(root, tmp_path / "emb", EmbedSpec(), shard_size=4, progress=False)
    with pytest.raises(EmbeddingStoreError, match="flip"):
        embed_directory(root, tmp_path / "emb", EmbedSpec(flip=False), shard_size=4, progress=False)
    summary = embed_directory(root, tmp_path / "emb", EmbedSpec(flip=False), shard_size=4, overwrite=True, progress=False)
    assert summary.embedded == 9


def test_empty_or_missing_inputs(tmp_path):
    with pytest.raises(EmbeddingStoreError, match="not found"):
        embed_directory(tmp_path / "absent", tmp_path / "emb", EmbedSpec(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingStoreError, match="no image files"):
        embed_directory(tmp_path / "empty", tmp_path / "emb", EmbedSpec(), progress=False)
    with pytest.raises(EmbeddingStoreError, match="no manifest.parquet"):
        load_embeddings(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        EmbedSpec(dtype="int8")


def test_crop_embedder_pickles_without_its_model_and_returns_result_columns(aligned, reference):
    root, names = aligned
    worker = CropEmbedder(root, EmbedSpec(normalize=False))
    first = worker.embed_paths(names[:2])
    clone = pickle.loads(pickle.dumps(worker))
    assert clone._embedder is None
    items = [Item(i, name, str(root / name)) for i, name in enumerate(names[:2])]
    out = clone(items)
    assert out.schema == result_schema(128, "float32")
    assert out.column("path").to_pylist() == names[:2] and out.column("status").to_pylist() == ["ok", "ok"]
    np.testing.assert_allclose(embeddings_of(out), first.embeddings, atol=1e-5)
    np.testing.assert_allclose(embeddings_of(out)[0], reference[names[0]], rtol=1e-4, atol=1e-4)


def _embedding_by_path(emb_dir):
    matrix, manifest = load_embeddings(emb_dir)
    assert manifest["index"].tolist() == list(range(len(manifest)))
    return {path: np.asarray(matrix[i]) for i, path in enumerate(manifest["path"])}, manifest


def test_growing_input_embeds_only_new_crops_and_removed_ones_leave_the_manifest(tmp_path, aligned):
    root = tmp_path / "aligned"
    shutil.copytree(aligned[0], root)
    spec = EmbedSpec()
    out = tmp_path / "emb"
    assert embed_directory(root, out, spec, shard_size=3, batch_size=2, progress=False).embedded == 9

    rng = np.random.default_rng(7)
    added = ["alice/9.png", "set1/alice/0.png", "set2/alice/0.png"]  # nested: two identities, not one "alice"
    for name in added:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8))
    summary = embed_directory(root, out, spec, shard_size=3, batch_size=2, progress=False)
    assert (summary.total, summary.embedded) == (12, 3)
    assert sorted(p.name for p in (out / "shards").glob("*.npy"))[-1] == "emb-000003.npy"  # one new shard
    grown, manifest = _embedding_by_path(out)
    fresh, fresh_manifest = _embedding_by_path(embed_directory(root, tmp_path / "fresh", spec, progress=False).out_dir)
    assert sorted(grown) == sorted(fresh) and len(grown) == 12
    for path in fresh:
        np.testing.assert_allclose(grown[path], fresh[path], atol=1e-5)
    assert manifest.drop(columns=["shard", "row"]).equals(fresh_manifest.drop(columns=["shard", "row"]))
    identity = manifest.set_index("path")["identity"]
    assert (identity["set1/alice/0.png"], identity["set2/alice/0.png"], identity["alice/9.png"]) == ("set1/alice", "set2/alice", "alice")

    for name in ("alice/0.png", "set1/alice/0.png"):
        (root / name).unlink()
    summary = embed_directory(root, out, spec, shard_size=3, batch_size=2, progress=False)
    assert (summary.total, summary.embedded, summary.removed) == (10, 0, 2)
    shrunk, manifest = _embedding_by_path(out)
    assert len(manifest) == 10 and sorted(shrunk) == sorted(set(fresh) - {"alice/0.png", "set1/alice/0.png"})
    for path in shrunk:  # rows taken by (shard, row): the matrix lines up although shard 0 and 3 lost a row
        np.testing.assert_allclose(shrunk[path], fresh[path], atol=1e-5)
    chunks = list(iter_shards(out))
    assert sum(len(m) for m, _ in chunks) == 10
    for matrix, rows in chunks:
        for i, path in enumerate(rows["path"]):
            np.testing.assert_allclose(matrix[i], fresh[path], atol=1e-5)


def test_overwrite_removes_what_the_old_settings_wrote(tmp_path, aligned):
    root, _ = aligned
    out = tmp_path / "emb"
    embed_directory(root, out, EmbedSpec(), shard_size=2, progress=False)
    assert len(list((out / "shards").glob("*.npy"))) == 5
    summary = embed_directory(root, out, EmbedSpec(flip=False), shard_size=4, overwrite=True, progress=False)
    assert summary.embedded == 9
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"emb-{i:06d}.{ext}" for i in range(3) for ext in ("npy", "parquet")
    ]
    assert load_embeddings(out)[1]["shard"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]


def test_a_manifest_from_before_the_quality_columns_reads_them_as_unknown(tmp_path):
    import pyarrow.parquet as pq

    from facepipe.embedding.store import read_manifest
    from tests.index.test_gallery import write_embedding_dir

    folder = write_embedding_dir(tmp_path / "emb", np.eye(3, 8), ["a", "b", "c"])
    table = pq.read_table(folder / "manifest.parquet")
    pq.write_table(table.drop(["sharpness"]), folder / "manifest.parquet")  # as written before sharpness existed
    manifest = read_manifest(folder)
    assert manifest["sharpness"].isna().all() and manifest["identity"].tolist() == ["a", "b", "c"]
    pq.write_table(table.drop(["identity"]), folder / "manifest.parquet")
    with pytest.raises(EmbeddingStoreError, match="not an embedding manifest \\(no identity column\\)"):
        read_manifest(folder)
