"""`facepipe embed` reads every layout `facepipe align` writes: the same crops give the same embeddings."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main as cli
from facepipe.embedding.crops import TarShardSource, open_crops
from facepipe.embedding.store import EmbedSpec, embed_directory, load_embeddings
from facepipe.pipeline.sources import RecordIOSource
from tests.conftest import shared_path

NAMES = ["001/frontal/01.jpg", "001/frontal/02.jpg", "002/frontal/01.jpg", "002/frontal/02.jpg", "003/frontal/01.jpg"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """The same five CFP photos aligned into each sink (two images per chunk: several tar shards)."""
    images_dir = shared_path("cfp", "cfp-dataset", "Data", "Images")
    root = tmp_path_factory.mktemp("sinks")
    for name in NAMES:
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images_dir / name, root / "images" / name)
    for sink in ("dir", "recordio", "tar"):
        result = CliRunner().invoke(cli, ["align", str(root / "images"), "--out", str(root / sink), "--sink", sink,
                                          "--workers", "0", "--chunk-size", "2", "--no-progress"])
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def embedded(aligned):
    out = {}
    for sink in ("dir", "recordio", "tar"):
        summary = embed_directory(aligned / sink, aligned / f"emb-{sink}", EmbedSpec(), batch_size=2, shard_size=3, progress=False)
        assert (summary.total, summary.errors) == (5, 0), sink
        out[sink] = load_embeddings(aligned / f"emb-{sink}")
    return out


def test_each_layout_gets_its_source(aligned):
    assert isinstance(open_crops(aligned / "recordio"), RecordIOSource)
    assert isinstance(open_crops(aligned / "recordio" / "train.rec"), RecordIOSource)
    assert isinstance(open_crops(aligned / "tar"), TarShardSource)
    assert [item.key for item in open_crops(aligned / "dir").items()] == NAMES  # .facepipe state skipped
    assert len(list((aligned / "tar" / "shards").glob("chunk-*.tar"))) == 3


def test_tar_shards_embed_like_the_folder(embedded):
    (dir_matrix, dir_rows), (tar_matrix, tar_rows) = embedded["dir"], embedded["tar"]
    assert tar_rows["path"].tolist() == dir_rows["path"].tolist() == NAMES
    assert tar_rows["identity"].tolist() == ["001/frontal", "001/frontal", "002/frontal", "002/frontal", "003/frontal"]
    np.testing.assert_array_equal(np.asarray(tar_matrix), np.asarray(dir_matrix))
    np.testing.assert_array_equal(tar_rows["det_score"], dir_rows["det_score"])
    assert np.isfinite(dir_rows["det_score"]).all()


def test_recordio_embeds_like_the_folder_with_the_identity_names_of_labels_tsv(embedded):
    (dir_matrix, dir_rows), (rec_matrix, rec_rows) = embedded["dir"], embedded["recordio"]
    record = rec_rows["path"].str.extract(r"/(\d+)\.jpg$")[0].astype(int)
    order = np.argsort(record.to_numpy())  # record k holds the k-th crop align wrote
    assert rec_rows["path"][order].tolist() == [f"{name.rsplit('/', 1)[0]}/{k}.jpg" for k, name in enumerate(NAMES, 1)]
    assert rec_rows["identity"][order].tolist() == dir_rows["identity"].tolist()
    np.testing.assert_array_equal(np.asarray(rec_matrix)[order], np.asarray(dir_matrix))
    np.testing.assert_array_equal(rec_rows["det_score"].to_numpy()[order], dir_rows["det_score"].to_numpy())


def test_realigning_a_recordio_keeps_the_identity_names(aligned, tmp_path):
    keys = [item.key for item in RecordIOSource(aligned / "recordio" / "train.rec").items()]
    assert keys == [f"{name.rsplit('/', 1)[0]}/{k}.jpg" for k, name in enumerate(NAMES, 1)]
    result = CliRunner().invoke(cli, ["align", str(aligned / "recordio" / "train.rec"), "--out", str(tmp_path / "again"),
                                      "--retry-padded", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    crops = sorted(p.relative_to(tmp_path / "again").as_posix() for p in (tmp_path / "again").rglob("*.jpg"))
    assert crops and set(crops) <= set(keys)  # identity folders by name (001/frontal/...), not by label number
    (tmp_path / "bare").mkdir()
    for name in ("train.rec", "train.idx"):
        shutil.copy(aligned / "recordio" / name, tmp_path / "bare" / name)
    assert [item.key.split("/")[0] for item in RecordIOSource(tmp_path / "bare" / "train.rec").items()] == ["0", "0", "1", "1", "2"]
    (tmp_path / "bare" / "labels.tsv").write_text("0\talice\nnot a label line\n")
    with pytest.raises(ValueError, match="labels.tsv:2"):
        RecordIOSource(tmp_path / "bare" / "train.rec")
