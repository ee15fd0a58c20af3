import pickle

import cv2
import numpy as np
import pytest

from facepipe.io.recordio import InsightfaceDatasetWriter
from facepipe.pipeline.sinks import OutputNames, identity_labels, output_folders
from facepipe.pipeline.sources import Item, SourceError, directory_source, file_list_source, open_source


def _write_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(path.suffix, np.full((8, 8, 3), 50, np.uint8))
        path.write_bytes(data.tobytes())


def test_directory_source_lists_every_image_format_sorted(tmp_path):
    _write_images(tmp_path, ["b/2.webp", "b/1.bmp", "a/x.png", "a/y.jpg", "top.jpeg"])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "dead.jpg").symlink_to(tmp_path / "missing.jpg")
    source = directory_source(tmp_path)
    keys = [item.key for item in source.items()]
    assert keys == ["a/dead.jpg", "a/x.png", "a/y.jpg", "b/1.bmp", "b/2.webp", "top.jpeg"]
    assert [item.index for item in source.items()] == list(range(6))
    assert source.items()[2].identity == "a" and source.items()[5].identity == ""
    assert source.read(source.items()[1]) == (tmp_path / "a" / "x.png").read_bytes()
    with pytest.raises(SourceError, match="input not found"):
        directory_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        directory_source(tmp_path / "empty")


def test_file_list_relative_absolute_and_comments(tmp_path):
    _write_images(tmp_path / "data", ["p1/a.jpg", "p2/b.png"])
    listing = tmp_path / "data" / "list.txt"
    listing.write_text(f"# two images\n\np1/a.jpg\n{tmp_path / 'data' / 'p2' / 'b.png'}\n")
    source = open_source(listing)
    assert [item.key for item in source.items()] == ["p1/a.jpg", "p2/b.png"]
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("data/p1/a.jpg\n")
    assert [item.key for item in file_list_source(outside).items()] == ["data/p1/a.jpg"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SourceError, match="names no images"):
        open_source(tmp_path / "empty.txt")


def test_recordio_source_is_picklable_and_reads_images(tmp_path):
    png = cv2.imencode(".png", np.full((4, 4, 3), 9, np.uint8))[1].tobytes()
    with InsightfaceDatasetWriter(tmp_path / "train.rec") as writer:
        writer.add(3, png)
        writer.add(4, png)
    source = open_source(tmp_path / "train.rec")
    items = source.items()
    assert [(i.key, i.label, i.identity) for i in items] == [("3/1.jpg", 3, "3"), ("4/2.jpg", 4, "4")]
    clone = pickle.loads(pickle.dumps(source))
    assert clone.read(items[1]) == png
    with pytest.raises(SourceError, match="index not found"):
        (tmp_path / "x.rec").write_bytes(b"")
        open_source(tmp_path / "x.rec")


def test_output_names_and_collisions():
    keys = ["id/a.jpg", "id/a.png", "id/b.jpg", "id/B.png"]
    names = OutputNames("jpg", keep_all=False, folders=output_folders(keys), committed=[])
    stems = [names.stem(key) for key in keys]
    assert stems == ["id/a", "id/a.png", "id/b", "id/B.png"]  # the first keeps the plain name; case-insensitive
    assert [names.names(stem, 1)[0] for stem in stems] == ["id/a.jpg", "id/a.png.jpg", "id/b.jpg", "id/B.png.jpg"]
    assert names.names("id/b", 0) == []
    assert OutputNames("png", True, [], []).names("id/b", 3) == ["id/b_0.png", "id/b_1.png", "id/b_2.png"]
    assert output_folders(["x/y/z.jpg", "top.jpg"]) == {"x", "x/y"}
    assert identity_labels([Item(0, "z/1.jpg", "s"), Item(1, "a/1.jpg", "s"), Item(2, "top.jpg", "s")]) == {
        "z": 0, "a": 1, "": 2,
    }
