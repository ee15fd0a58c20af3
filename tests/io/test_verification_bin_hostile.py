import struct
import time

import pytest

from facepipe.io.verification_bin import VerificationBinError, read_bin, write_bin


def _memo_bomb(levels: int = 10, width: int = 40) -> bytes:
    """L0 = [], L(i) = [L(i-1)] * 40 by reference: 900 bytes describing a tree of 40**10 lists, shallow enough
    to pass a depth limit."""
    ops = [b"\x80\x02", b"]q\x00"]
    for i in range(1, levels + 1):
        ops.append(b"(" + (b"h" + bytes([i - 1])) * width + b"lq" + bytes([i]))
    ops.append(b"]\x86.")  # (L10, []) as the (images, issame) pair
    return b"".join(ops)


def _deep_nesting(depth: int = 100_000) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"]\x86."


def _huge_declared_length() -> bytes:
    return b"\x80\x04\x8e" + struct.pack("<Q", 70 << 30) + b"\x00" * 8_000  # BINBYTES8 of 70 GiB


@pytest.mark.parametrize(
    "payload, reason",
    [
        (_memo_bomb(), "more than .* elements"),
        (_deep_nesting(), "nesting deeper than"),
        (_huge_declared_length(), "not a readable pickle: .*bytes8"),
    ],
    ids=["memo-dag-bomb", "deep-nesting", "70GiB-length"],
)
def test_hostile_pickles_are_refused_in_one_line_within_a_second(tmp_path, payload, reason):
    path = tmp_path / "hostile.bin"
    path.write_bytes(payload)
    start = time.process_time()
    with pytest.raises(VerificationBinError, match=reason) as info:
        read_bin(path)
    assert time.process_time() - start < 1.0  # CPU time: the shared test machine may be busy
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_honest_file_with_a_repeated_image_still_loads(tmp_path):
    image = b"\xff\xd8" + b"x" * 1000
    write_bin([image, image, image, b"other"], [True, False], tmp_path / "ok.bin")  # shared by reference
    content = read_bin(tmp_path / "ok.bin")
    assert content.images == [image, image, image, b"other"] and content.issame.tolist() == [True, False]


def test_fifo_bin_is_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "lfw.bin")
    with pytest.raises(VerificationBinError, match="FIFO"):
        read_bin(tmp_path / "lfw.bin")
