from pathlib import Path

import numpy as np
import pytest

from facepipe.evaluation.protocols import ProtocolError, read_cfp_pairs, read_lfw_pairs
from tests.conftest import shared_path


@pytest.mark.parametrize("protocol", ["FF", "FP"])
def test_cfp_real_protocol_counts_and_paths(protocol):
    root = shared_path("cfp", "cfp-dataset")
    pairs = read_cfp_pairs(root, protocol)
    assert len(pairs) == 7000
    assert pairs.folds == list(range(1, 11))
    for fold in range(1, 11):
        in_fold = pairs.fold == fold
        assert in_fold.sum() == 700
        assert pairs.issame[in_fold].sum() == 350
    # Ordered by split, same/different alternating inside a split.
    assert np.all(np.diff(pairs.fold) >= 0)
    assert pairs.issame[:6].tolist() == [True, False] * 3
    assert not pairs.missing_paths()
    assert all(p.parent.name == "frontal" for p in pairs.left)
    right_kind = "frontal" if protocol == "FF" else "profile"
    assert all(p.parent.name == right_kind for p in pairs.right)
    # First lines of Split/<protocol>/01: same "a,b" and diff "a,b" resolved through Pair_list_{F,P}.txt.
    split = root / "Protocol" / "Split" / protocol / "01"
    a, b = map(int, (split / "same.txt").read_text().split()[0].split(","))
    c, d = map(int, (split / "diff.txt").read_text().split()[0].split(","))
    frontal = {int(n): p for n, p in (line.split() for line in (root / "Protocol" / "Pair_list_F.txt").read_text().splitlines())}
    second = frontal if protocol == "FF" else {
        int(n): p for n, p in (line.split() for line in (root / "Protocol" / "Pair_list_P.txt").read_text().splitlines())
    }
    assert pairs.left[0] == (root / "Protocol" / frontal[a]).resolve()
    assert pairs.right[0] == (root / "Protocol" / second[b]).resolve()
    assert pairs.left[1] == (root / "Protocol" / frontal[c]).resolve()
    assert pairs.right[1] == (root / "Protocol" / second[d]).resolve()
    # Same pairs share the identity folder, different pairs never do.
    same_identity = np.array([l.parent.parent == r.parent.parent for l, r in zip(pairs.left, pairs.right)])
    np.testing.assert_array_equal(same_identity, pairs.issame)


def test_cfp_subset_is_balanced_and_accepts_protocol_folder():
    root = shared_path("cfp", "cfp-dataset")
    pairs = read_cfp_pairs(root / "Protocol", "FP").subset([2, 5], limit=10)
    assert len(pairs) == 20 and pairs.folds == [2, 5]
    assert pairs.issame.sum() == 10
    with pytest.raises(ProtocolError, match="unknown fold"):
        pairs.subset([3])
    with pytest.raises(ProtocolError, match="not a CFP data set"):
        read_cfp_pairs(root / "Data", "FF")
    with pytest.raises(ProtocolError, match="unknown CFP protocol"):
        read_cfp_pairs(root, "PP")


def test_lfw_real_pairs_file():
    pairs_file = shared_path("lfw", "pairs.txt")
    root = Path("/lfw")
    pairs = read_lfw_pairs(pairs_file, root)
    assert len(pairs) == 6000 and pairs.issame.sum() == 3000
    assert pairs.folds == list(range(1, 11))
    assert all((pairs.fold == f).sum() == 600 for f in range(1, 11))
    # First same line "Abel_Pacheco 1 4"; first different line "Abdel_Madi_Shabneh 1 Dean_Barker 1".
    assert pairs.left[0] == root / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"
    assert pairs.right[0] == root / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg"
    assert pairs.left[1] == root / "Abdel_Madi_Shabneh" / "Abdel_Madi_Shabneh_0001.jpg"
    assert pairs.right[1] == root / "Dean_Barker" / "Dean_Barker_0001.jpg"
    assert pairs.issame[:2].tolist() == [True, False]
    same_name = np.array([l.parent.name == r.parent.name for l, r in zip(pairs.left, pairs.right)])
    np.testing.assert_array_equal(same_name, pairs.issame)
    # The two sample images of the shared folder are found where the protocol expects LFW images.
    shared_root = shared_path("lfw")
    assert (shared_root / "Anthony_Hopkins_0001.jpg").is_file()


def test_lfw_single_set_header_and_errors(tmp_path):
    good = tmp_path / "pairsDev.txt"
    good.write_text("2\nA 1 2\nB 3 4\nA 1 B 2\nC 1 D 1\n")
    pairs = read_lfw_pairs(good, tmp_path)
    assert len(pairs) == 4 and pairs.folds == [1]
    assert pairs.issame.tolist() == [True, False, True, False]
    assert pairs.right[3] == tmp_path / "D" / "D_0001.jpg"
    short = tmp_path / "short.txt"
    short.write_text("10\t300\nA 1 2\n")
    with pytest.raises(ProtocolError, match="header says 10 x \\(2 x 300\\) pairs, file has 1 lines"):
        read_lfw_pairs(short, tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t1\nA 1\nA 1 B 2\n")
    with pytest.raises(ProtocolError, match="bad.txt:2: expected a same pair"):
        read_lfw_pairs(bad, tmp_path)
    with pytest.raises(ProtocolError, match="not found"):
        read_lfw_pairs(tmp_path / "none.txt", tmp_path)
