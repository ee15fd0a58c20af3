"""``facepipe detect`` stopped by Ctrl-C or ``kill``: one line, exit 128 + signal, no output and no stray file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shared_path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_detect_writes_nothing_and_says_so(tmp_path: Path, signum: int) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(200):  # MTCNN on a 1280x886 group photo: well over the few seconds the test waits
        shutil.copy(shared_path("images", "group", "t1.jpg"), photos / f"p{i:03d}.jpg")
    out = tmp_path / "faces.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.Popen([sys.executable, "-m", "facepipe", "detect", str(photos), "--out", str(out),
                            "--detector", "mtcnn", "--batch-size", "1"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".faces.jsonl.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # inside the detection loop
    run.send_signal(signum)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({signal.Signals(signum).name}): nothing written to "), stderr
    assert "Traceback" not in stderr + stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no output, no .partial
