import os
import subprocess
import sys
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facepipe.io.images import ImageDecodeError, list_images
from facepipe.pipeline.sources import directory_source, identity_of

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, value: int = 50) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.imencode(".png", np.full((8, 8, 3), value, np.uint8))[1].tobytes()
    path.write_bytes(data)
    return data


def test_identity_is_the_whole_parent_path():
    assert identity_of("set1/alice/01.jpg") == "set1/alice"
    assert identity_of("alice/01.jpg") == "alice"
    assert identity_of("01.jpg") == ""


def test_fifo_device_and_non_utf8_names_become_items_not_hangs(tmp_path):
    alice = _png(tmp_path / "alice" / "a.png")
    os.mkfifo(tmp_path / "alice" / "y.jpg")
    (tmp_path / "alice" / "z.jpg").symlink_to("/dev/zero")
    raw_name = os.fsencode(str(tmp_path / "bob")) + b"/b\xff.png"
    os.makedirs(tmp_path / "bob")
    with open(raw_name, "wb") as f:
        f.write(alice)
    source = directory_source(tmp_path)
    items = {item.key: item for item in source.items()}
    assert sorted(items) == ["alice/a.png", "alice/y.jpg", "alice/z.jpg", "bob/b\\xff.png"]
    assert all(key.encode("utf-8") and item.source.encode("utf-8") for key, item in items.items())
    assert source.read(items["bob/b\\xff.png"]) == alice  # the escaped name still reads the real file
    with pytest.raises(ImageDecodeError, match="FIFO"):
        source.read(items["alice/y.jpg"])
    with pytest.raises(ImageDecodeError, match="character device"):
        source.read(items["alice/z.jpg"])


def test_symlinked_identity_folders_are_followed_and_loops_stopped(tmp_path):
    data = tmp_path / "data"
    carol = _png(data / "store" / "carol" / "1.png", 10)
    _png(data / "dave" / "1.png", 20)
    (data / "carol").symlink_to(data / "store" / "carol", target_is_directory=True)
    (data / "dave" / "again").symlink_to(data / "dave", target_is_directory=True)  # a loop
    (data / "dave" / "2.png").symlink_to(data / "store" / "carol" / "1.png")  # a symlinked file
    source = directory_source(data)
    keys = [item.key for item in source.items()]
    assert keys == ["carol/1.png", "dave/1.png", "dave/2.png", "store/carol/1.png"]
    items = source.items()
    assert items[0].identity == "carol" and source.read(items[0]) == carol and source.read(items[2]) == carol
    assert len(list_images(data)) == 4


_CHILD = """
import sys
from facepipe.pipeline.sources import directory_source
source = directory_source(sys.argv[1])
for item in source.items():
    try:
        source.read(item)
        print(item.key, "ok")
    except Exception as exc:
        print(item.key, "error:", exc)
"""


def test_unreadable_folder_becomes_an_error_item(tmp_path):
    _png(tmp_path / "alice" / "a.png")
    _png(tmp_path / "locked" / "b.png")
    os.chmod(tmp_path / "locked", 0o000)
    command = [sys.executable, "-c", _CHILD, str(tmp_path)]
    if os.geteuid() == 0:  # root reads any folder: run the walk without the capabilities that override modes
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a folder unreadable")
        drop = "-dac_override,-dac_read_search"
        command = [setpriv, "--bounding-set", drop, "--inh-caps", drop, "--", *command]
    try:
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["alice/a.png ok", "locked error: cannot list folder: Permission denied"]


def test_file_list_with_non_utf8_paths(tmp_path):
    from facepipe.pipeline.sources import file_list_source

    data = _png(tmp_path / "a.png")
    raw = os.fsencode(str(tmp_path)) + b"/c\xe9.png"
    with open(raw, "wb") as f:
        f.write(data)
    (tmp_path / "list.txt").write_bytes(b"a.png\nc\xe9.png\n")
    source = file_list_source(tmp_path / "list.txt")
    items = source.items()
    assert [i.key for i in items] == ["a.png", "c\\xe9.png"]
    assert source.read(items[1]) == data


def test_align_keeps_going_past_non_utf8_names_and_fifos(tmp_path):
    from facepipe.pipeline.align import AlignConfig, run_align
    from facepipe.pipeline.manifest import read_manifest
    from tests.conftest import shared_path

    face = shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", "01.jpg").read_bytes()
    src = tmp_path / "in"
    (src / "alice").mkdir(parents=True)
    (src / "alice" / "a.jpg").write_bytes(face)
    with open(os.fsencode(str(src / "alice")) + b"/b\xff.jpg", "wb") as f:
        f.write(face)
    os.mkfifo(src / "alice" / "y.jpg")
    run_align(AlignConfig(), directory_source(src), tmp_path / "out", workers=0, progress=False)
    rows = {row.key: (row.status, row.reason) for row in read_manifest(tmp_path / "out" / "manifest.parquet")}
    assert rows == {
        "alice/a.jpg": ("ok", ""),
        "alice/b\\xff.jpg": ("ok", ""),
        "alice/y.jpg": ("error", "not a regular file: a FIFO (named pipe)"),
    }
    assert (tmp_path / "out" / "alice" / "b\\xff.jpg").is_file()
