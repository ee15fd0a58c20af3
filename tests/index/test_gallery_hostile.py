import os
import shutil

import numpy as np
import pytest

from facepipe.index import Gallery, GalleryError, IndexParams, build_gallery
from tests.index.test_gallery import write_embedding_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    vectors = np.random.default_rng(1).standard_normal((40, 16))
    emb = write_embedding_dir(root / "emb", vectors, [f"id{i % 5}" for i in range(40)])
    build_gallery([emb], root / "g.faiss", IndexParams("flat"), progress=False)
    return root


def _copy(built, tmp_path):
    for name in ("g.faiss", "g.faiss.parquet", "g.faiss.json"):
        shutil.copy(built / name, tmp_path / name)
    return tmp_path / "g.faiss"


@pytest.mark.parametrize(
    "target, damage, reason",
    [
        ("g.faiss", os.urandom(4096), "not a readable FAISS index"),
        ("g.faiss", b"", "not a readable FAISS index"),
        ("g.faiss", "truncate", "not a readable FAISS index"),
        ("g.faiss.parquet", b"PAR1 not really", "not a readable gallery mapping"),
        ("g.faiss.json", b"{\"params\": ", "not a readable gallery description"),
        ("g.faiss.json", b"{\"params\": {}, \"dim\": 16}", "not a readable gallery description"),
        ("g.faiss.json", b"\xff\xfe", "not a readable gallery description"),
    ],
    ids=["random-index", "empty-index", "truncated-index", "bad-parquet", "bad-json", "json-wrong-fields", "non-utf8"],
)
def test_corrupt_gallery_files_give_one_line(built, tmp_path, target, damage, reason):
    path = _copy(built, tmp_path)
    file = tmp_path / target
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2] if damage == "truncate" else damage)
    with pytest.raises(GalleryError, match=reason) as info:
        Gallery(path)
    assert "\n" not in str(info.value) and target in str(info.value)


def test_mapping_without_columns_and_fifo_index(built, tmp_path):
    import pandas as pd

    path = _copy(built, tmp_path)
    pd.DataFrame({"id": np.arange(40)}).to_parquet(tmp_path / "g.faiss.parquet")
    with pytest.raises(GalleryError, match="missing columns"):
        Gallery(path)
    (tmp_path / "g.faiss").unlink()
    os.mkfifo(tmp_path / "g.faiss")
    with pytest.raises(GalleryError, match="FIFO"):
        Gallery(path)
    (tmp_path / "ok").mkdir()
    assert Gallery(_copy(built, tmp_path / "ok")).index.ntotal == 40


_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a refused allocation, never an OOM kill
from facepipe.index import Gallery, GalleryError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    Gallery(sys.argv[1])
except GalleryError as exc:
    print(exc)
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_index_header_declaring_huge_vectors_is_refused_without_allocating(built, tmp_path):
    import struct
    import subprocess
    import sys
    from pathlib import Path

    path = _copy(built, tmp_path)
    data = bytearray(path.read_bytes())
    count = struct.pack("<Q", 40 * 16)  # IndexFlat: the float vector of 40 x 16-d codes
    at = data.index(count)
    data[at : at + 8] = struct.pack("<Q", 1 << 28)  # 1 GiB of floats declared in a 3 KB file
    path.write_bytes(bytes(data))
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert "not a readable FAISS index" in out.stdout, out.stdout + out.stderr
    assert int(out.stdout.split("grew_mb")[1]) < 100  # FAISS would zero-fill the declared 1 GiB before reading
