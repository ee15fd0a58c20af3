import pytest

from facepipe.evaluation.protocols import ProtocolError, read_cfp_pairs, read_lfw_pairs


def _cfp_tree(root, pair_list: bytes):
    protocol = root / "Protocol"
    (protocol / "Split" / "FF" / "01").mkdir(parents=True)
    (protocol / "Pair_list_F.txt").write_bytes(pair_list)
    (protocol / "Split" / "FF" / "01" / "same.txt").write_text("1,2\n")
    (protocol / "Split" / "FF" / "01" / "diff.txt").write_text("1,2\n")
    return root


def test_valid_files_still_read(tmp_path):
    root = _cfp_tree(tmp_path, b"1 ../Data/a.jpg\n2 ../Data/b.jpg\n")
    assert len(read_cfp_pairs(root, "FF")) == 2
    (tmp_path / "pairs.txt").write_text("1\nalice 1 2\nalice 1 bob 1\n")
    assert read_lfw_pairs(tmp_path / "pairs.txt", tmp_path).issame.tolist() == [True, False]


def test_non_utf8_pair_list_names_file_and_line(tmp_path):
    _cfp_tree(tmp_path, b"1 ../Data/a.jpg\n2 ../Data/\xff\xfe.jpg\n")
    with pytest.raises(ProtocolError, match=r"Pair_list_F.txt: line 2: not UTF-8 text \(byte 0xff\)"):
        read_cfp_pairs(tmp_path, "FF")
    (tmp_path / "pairs.txt").write_bytes(b"1\nal\xe9 1 2\nalice 1 bob 1\n")
    with pytest.raises(ProtocolError, match=r"pairs.txt: line 2: not UTF-8"):
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path)


@pytest.mark.parametrize("bad", ["alice 1 ²", "alice nan 2", "alice inf 2", "alice 1e3 2"])
def test_non_integer_values_are_refused_naming_the_line(tmp_path, bad):
    (tmp_path / "pairs.txt").write_text(f"1\n{bad}\nalice 1 bob 1\n")
    with pytest.raises(ProtocolError, match=r"pairs.txt:2: expected a same pair"):
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path)


def test_fifo_protocol_file_is_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "pairs.txt")
    with pytest.raises(ProtocolError, match="FIFO"):
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path)
