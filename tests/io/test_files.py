import os
import signal

import pytest

from facepipe.io.files import FileReadError, os_path_of, printable_path, read_file_bounded


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) when a read blocks for more than 5 s."""

    def _hang(signum, frame):
        raise TimeoutError("read blocked")

    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifo_and_device_are_refused_without_blocking(tmp_path, deadline):
    os.mkfifo(tmp_path / "y.jpg")
    with pytest.raises(FileReadError, match="FIFO"):
        read_file_bounded(tmp_path / "y.jpg", 1 << 20)
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    with pytest.raises(FileReadError, match="character device"):
        read_file_bounded(tmp_path / "z.jpg", 1 << 20)
    with pytest.raises(FileReadError, match="is a directory"):
        read_file_bounded(tmp_path, 1 << 20)


def test_byte_cap_and_missing_files(tmp_path):
    (tmp_path / "ten.bin").write_bytes(b"0123456789")
    assert read_file_bounded(tmp_path / "ten.bin", 10) == b"0123456789"
    with pytest.raises(FileReadError, match="too large: 10 bytes > 9"):
        read_file_bounded(tmp_path / "ten.bin", 9)
    with pytest.raises(FileReadError, match="file not found"):
        read_file_bounded(tmp_path / "nope", 10)
    (tmp_path / "dead").symlink_to(tmp_path / "nope")
    with pytest.raises(FileReadError, match="broken symbolic link"):
        read_file_bounded(tmp_path / "dead", 10)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(FileReadError, match="symbolic link loop"):
        read_file_bounded(tmp_path / "loop", 10)


def test_printable_path_round_trips_non_utf8_names(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/b\xff\xfe.jpg"
    with open(raw, "wb") as f:
        f.write(b"x")
    name = os.fsdecode(raw)
    text = printable_path(name)
    assert text.endswith("b\\xff\\xfe.jpg") and text.encode("utf-8")  # valid UTF-8 now
    assert os_path_of(text) == name and read_file_bounded(os_path_of(text), 10) == b"x"
    assert printable_path(tmp_path / "plain-é.jpg") == str(tmp_path / "plain-é.jpg")
    literal = tmp_path / "a\\x41.jpg"  # a real backslash in a UTF-8 name is taken as written
    literal.write_bytes(b"y")
    assert os_path_of(printable_path(literal)) == str(literal)
