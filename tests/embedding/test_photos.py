"""`facepipe embed PHOTOS --detect`: one pass equals `align` + `embed` (exactly with PNG crops, within JPEG noise
with JPEG crops), with the detection columns, one row per face with --keep all, and growing inputs."""

import pickle
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from facepipe.cli import main as cli
from facepipe.embedding.photos import DetectSpec, embed_photos
from facepipe.embedding.store import EmbeddingStoreError, EmbedSpec, embed_directory, load_embeddings
from tests.conftest import shared_path

NAMES = ["001/frontal/01.jpg", "001/frontal/02.jpg", "002/frontal/01.jpg", "002/profile/01.jpg", "003/frontal/01.jpg"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    images_dir = shared_path("cfp", "cfp-dataset", "Data", "Images")
    root = tmp_path_factory.mktemp("photos") / "photos"
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images_dir / name, root / name)
    cv2.imwrite(str(root / "blank.png"), np.full((160, 160, 3), 128, np.uint8))
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def one_pass(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_pass") / "emb"
    summary = embed_photos(photos, out, EmbedSpec(), DetectSpec(), batch_size=3, shard_size=4, progress=False)
    assert (summary.total, summary.embedded, summary.faces, summary.no_face, summary.errors) == (7, 7, 5, 1, 1)
    return load_embeddings(out)


def align_then_embed(photos, tmp_path, image_format):
    result = CliRunner().invoke(cli, ["align", str(photos), "--out", str(tmp_path / "aligned"), "--format", image_format,
                                      "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    embed_directory(tmp_path / "aligned", tmp_path / "emb", EmbedSpec(), progress=False)
    align = pd.read_parquet(tmp_path / "aligned" / "manifest.parquet").set_index("key")
    matrix, manifest = load_embeddings(tmp_path / "emb")
    by_crop = {path: np.asarray(matrix[i]) for i, path in enumerate(manifest["path"])}
    return align, by_crop


@pytest.mark.parametrize("image_format, min_cosine", [("png", 1 - 1e-6), ("jpg", 0.99)])
def test_one_pass_equals_align_then_embed(photos, one_pass, tmp_path, image_format, min_cosine):
    matrix, manifest = one_pass
    align, by_crop = align_then_embed(photos, tmp_path, image_format)
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["source"]) == sorted(align.index[align["status"] == "ok"])
    cosines = []
    for i, row in ok.iterrows():
        expected = align.loc[row["source"]]
        assert row["path"] == row["source"] and row["identity"] == row["source"].rsplit("/", 1)[0]
        cosines.append(float(np.dot(matrix[i], by_crop[expected["outputs"][0]])))
        np.testing.assert_allclose(row["box"], expected["boxes"][0], rtol=1e-6)
        np.testing.assert_allclose(np.stack(row["landmarks"]), np.stack(expected["landmarks"][0]), rtol=1e-6)
        assert row["det_score"] == pytest.approx(expected["scores"][0], abs=1e-7)
    print(f"\n{image_format} crops: one-pass vs align+embed cosine min {min(cosines):.6f} mean {np.mean(cosines):.6f}")
    assert min(cosines) >= min_cosine


def test_photos_without_a_face_or_unreadable_keep_a_row(one_pass):
    matrix, manifest = one_pass
    rows = manifest.set_index("path")
    assert rows.loc["blank.png", "status"] == "no_face" and rows.loc["broken.jpg", "status"] == "error"
    assert rows.loc["blank.png", "box"] is None and not matrix[int(rows.loc["blank.png", "index"])].any()


def test_keep_all_gives_a_row_per_face_and_growing_or_shrinking_photos_redo_nothing(photos, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos / "001", root / "001")
    left, right = (cv2.imread(str(photos / name)) for name in (NAMES[0], NAMES[2]))
    out = tmp_path / "emb"
    detect = DetectSpec(keep="all")
    assert embed_photos(root, out, EmbedSpec(), detect, progress=False).faces == 2
    pair = np.zeros((max(left.shape[0], right.shape[0]), left.shape[1] + right.shape[1], 3), np.uint8)
    pair[: left.shape[0], : left.shape[1]] = left
    pair[: right.shape[0], left.shape[1] :] = right
    cv2.imwrite(str(root / "pair.png"), pair)
    summary = embed_photos(root, out, EmbedSpec(), detect, progress=False)
    assert (summary.total, summary.embedded, summary.faces) == (3, 1, 4)
    matrix, manifest = load_embeddings(out)
    pair = manifest[manifest["source"] == "pair.png"]
    assert pair["path"].tolist() == ["pair.png#0", "pair.png#1"]
    alone = matrix[int(manifest.set_index("path").loc[f"{NAMES[0]}#0", "index"])]
    assert max(float(np.dot(matrix[i], alone)) for i in pair["index"]) > 0.9  # the same face, found in the pair
    (root / "001" / "frontal" / "02.jpg").unlink()
    summary = embed_photos(root, out, EmbedSpec(), detect, progress=False)
    assert (summary.total, summary.embedded, summary.removed, summary.faces) == (2, 0, 1, 3)
    assert "001/frontal/02.jpg" not in set(load_embeddings(out)[1]["source"])
    with pytest.raises(EmbeddingStoreError, match="detect_keep"):
        embed_photos(root, out, EmbedSpec(), DetectSpec(keep="largest"), progress=False)


def test_raw_photos_to_a_gallery_in_one_command(photos, tmp_path):
    """The README's two commands: `embed photos/ --detect` then `index build`."""
    runner = CliRunner()
    result = runner.invoke(cli, ["embed", str(photos), "--detect", "--out", str(tmp_path / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "7 photos: 7 embedded now" in result.output and "5 faces, 1 without a face, 1 unreadable" in result.output
    result = runner.invoke(cli, ["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "gallery.faiss")])
    assert result.exit_code == 0, result.output
    mapping = pd.read_parquet(tmp_path / "gallery.faiss.parquet")
    assert sorted(mapping["path"]) == sorted(n for n in NAMES) and set(mapping["identity"]) == {n.rsplit("/", 1)[0] for n in NAMES}
    for wrong in (["--keep", "all"], ["--pad-ratio", "0.2"]):  # detection options without --detect: one line
        result = runner.invoke(cli, ["embed", str(photos), "--out", str(tmp_path / "x"), *wrong])
        assert result.exit_code == 2 and "only apply with --detect" in result.output
    result = runner.invoke(cli, ["embed", str(photos / NAMES[0]), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "raw photos: add --detect" in result.output


def test_face_embedder_pickles_without_its_models_and_gives_the_same_rows(photos):
    from facepipe.embedding.photos import FaceEmbedder
    from facepipe.embedding.store import embeddings_of
    from facepipe.pipeline.sources import directory_source

    source = directory_source(photos)
    items = [item for item in source.items() if item.key in (NAMES[0], "blank.png")]
    worker = FaceEmbedder(source, DetectSpec(), EmbedSpec())
    first = worker(items)
    clone = pickle.loads(pickle.dumps(worker))
    assert clone._embedder is None and clone._detector is None
    again = clone(items)
    assert again.column("status").to_pylist() == ["ok", "no_face"] == first.column("status").to_pylist()
    np.testing.assert_array_equal(embeddings_of(again), embeddings_of(first))


def test_a_batch_given_up_on_becomes_error_rows_with_every_detection_column(tmp_path):
    """What the engine commits for a batch whose worker kept dying: one error row per photo, schema complete."""
    from facepipe.embedding.photos import DetectSpec, embed_photos_job
    from facepipe.embedding.store import EmbedSpec
    from facepipe.pipeline.sources import Item

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(shared_path("images", "group", "t1.jpg").read_bytes())
    with embed_photos_job(photos, tmp_path / "emb", EmbedSpec(), DetectSpec()) as job:
        rows = job.failed([Item(0, "a.jpg", str(photos / "a.jpg"))], "worker died 3 times")
    assert rows.column("status").to_pylist() == ["error"] and rows.column("reason").to_pylist() == ["worker died 3 times"]
    assert rows.column("inter_ocular").to_pylist()[0] != rows.column("inter_ocular").to_pylist()[0]  # NaN
