import numpy as np
import pytest
from scipy import interpolate

from facepipe.evaluation.verification import (
    ACCURACY_THRESHOLDS,
    VAL_THRESHOLDS,
    evaluate_distances,
    evaluate_embeddings,
    evaluate_interleaved,
    group_splits,
    kfold_splits,
    plot_roc,
    threshold_at_far,
    xnorm,
)


# ------------------------------------------------------------------ a plain loop version of insightface's code


def _reference_kfold(n, k):
    """scikit-learn KFold(k, shuffle=False): fold sizes n//k, the first n%k one larger, consecutive."""
    fold_sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    out, current = [], 0
    for size in fold_sizes:
        test = list(range(current, current + size))
        train = [i for i in range(n) if i not in test]
        out.append((np.array(train), np.array(test)))
        current += size
    return out


def _reference_accuracy(threshold, dist, issame):
    predict = dist < threshold
    tp = np.sum(predict & issame)
    fp = np.sum(predict & ~issame)
    tn = np.sum(~predict & ~issame)
    fn = np.sum(~predict & issame)
    tpr = 0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / dist.size


def _reference_val_far(threshold, dist, issame):
    predict = dist < threshold
    return np.sum(predict & issame) / np.sum(issame), np.sum(predict & ~issame) / np.sum(~issame)


def _reference_threshold(far_train, thresholds, target):
    # insightface: interp1d(far_train, thresholds, kind="slinear")(target). In the scipy versions it ran on,
    # that sorted x stably and built a degree-1 B-spline with knots r_[x0, x, x_last] and coefficients y
    # (repeated x allowed); current scipy refuses repeated x, so build that spline directly.
    order = np.argsort(far_train, kind="mergesort")
    x, y = far_train[order], thresholds[order]
    return float(interpolate.BSpline(np.r_[x[0], x, x[-1]], y, 1)(target))


def _reference_evaluate(dist, issame, n_folds=10):
    accuracies, best, tprs, fprs, vals, fars = [], [], [], [], [], []
    for train, test in _reference_kfold(len(dist), n_folds):
        acc_train = np.array([_reference_accuracy(t, dist[train], issame[train])[2] for t in ACCURACY_THRESHOLDS])
        best_index = int(np.argmax(acc_train))
        tprs.append([_reference_accuracy(t, dist[test], issame[test])[0] for t in ACCURACY_THRESHOLDS])
        fprs.append([_reference_accuracy(t, dist[test], issame[test])[1] for t in ACCURACY_THRESHOLDS])
        accuracies.append(_reference_accuracy(ACCURACY_THRESHOLDS[best_index], dist[test], issame[test])[2])
        best.append(ACCURACY_THRESHOLDS[best_index])
        far_train = np.array([_reference_val_far(t, dist[train], issame[train])[1] for t in VAL_THRESHOLDS])
        threshold = _reference_threshold(far_train, VAL_THRESHOLDS, 1e-3) if far_train.max() >= 1e-3 else 0.0
        v, f = _reference_val_far(threshold, dist[test], issame[test])
        vals.append(v)
        fars.append(f)
    return accuracies, best, np.mean(tprs, 0), np.mean(fprs, 0), vals, fars


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("n, k", [(6000, 10), (7000, 10), (23, 10), (10, 10), (701, 7)])
def test_kfold_matches_sklearn_semantics(n, k):
    ours = kfold_splits(n, k)
    if n <= 1000:
        reference = _reference_kfold(n, k)
        for (train, test), (ref_train, ref_test) in zip(ours, reference):
            np.testing.assert_array_equal(test, ref_test)
            np.testing.assert_array_equal(train, ref_train)
    sizes = [len(test) for _, test in ours]
    assert sizes == [n // k + (1 if i < n % k else 0) for i in range(k)]
    assert np.array_equal(np.sort(np.concatenate([t for _, t in ours])), np.arange(n))
    with pytest.raises(ValueError):
        kfold_splits(5, 10)


def test_group_splits_use_each_fold_once():
    splits = group_splits([3, 3, 1, 1, 2])
    assert [test.tolist() for _, test in splits] == [[2, 3], [4], [0, 1]]
    assert [train.tolist() for train, _ in splits] == [[0, 1, 4], [0, 1, 2, 3], [2, 3, 4]]


def test_separable_pairs_first_best_threshold():
    # 10 folds of (same at 0.5, different at 1.5): every threshold in (0.5, 1.5] is perfect; the first is 0.51.
    dist = np.tile([0.5, 1.5], 10)
    issame = np.tile([True, False], 10)
    result = evaluate_distances(dist, issame)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert result.best_thresholds == pytest.approx([0.51] * 10)


def test_one_hard_pair_hand_computed():
    # Fold 0 holds a same pair at distance 1.2 (above the different pair at 1.0); the others (0.2, 1.0).
    # Trained without fold 0 -> threshold 0.21 -> fold 0 scores 1/2. With fold 0 in training the best threshold
    # stays 0.21 (1 error) since anything in (1.0, 1.2] errs on every different pair -> other folds score 1.
    dist = np.tile([0.2, 1.0], 10)
    dist[0] = 1.2
    issame = np.tile([True, False], 10)
    result = evaluate_distances(dist, issame)
    assert result.fold_accuracies == [0.5] + [1.0] * 9
    assert result.best_thresholds == pytest.approx([0.21] * 10)
    assert result.accuracy == pytest.approx(0.95)
    assert result.accuracy_std == pytest.approx(0.15)  # population std of [0.5, 1 x 9]


def test_threshold_at_far_hand_computed():
    thresholds = np.arange(6, dtype=np.float64)
    far = np.array([0.0, 0.0, 0.0005, 0.0005, 0.002, 0.01])
    # Bracket: (far 0.0005 at the last threshold of its run, 3) -> (0.002 at 4): 3 + 0.0005 / 0.0015.
    assert threshold_at_far(far, thresholds, 1e-3) == pytest.approx(3 + 1 / 3)
    assert threshold_at_far(far, thresholds, 0.0005) == 3.0  # exact hit: largest threshold of the run
    assert threshold_at_far(far, thresholds, 0.5) == 0.0  # never reached
    strictly = np.array([0.0, 0.0004, 0.0009, 0.0011, 0.003, 0.02])
    scipy_value = float(interpolate.interp1d(strictly, thresholds, kind="slinear")(1e-3))
    assert threshold_at_far(strictly, thresholds, 1e-3) == pytest.approx(scipy_value)
    for target in (1e-3, 0.0005, 0.0001, 0.002):
        assert threshold_at_far(far, thresholds, target) == pytest.approx(_reference_threshold(far, thresholds, target))


def test_equals_straightforward_reimplementation_on_realistic_distances():
    rng = np.random.default_rng(0)
    n = 1200
    issame = rng.random(n) < 0.5
    # Same pairs around 0.8, different around 1.7 (squared distances of unit vectors), with overlap.
    dist = np.clip(np.where(issame, rng.normal(0.8, 0.3, n), rng.normal(1.7, 0.25, n)), 0, 4)
    dist = np.round(dist, 3)  # many ties with the 0.001 threshold grid, as real data has
    result = evaluate_distances(dist, issame)
    accuracies, best, tpr, fpr, vals, fars = _reference_evaluate(dist, issame)
    assert result.fold_accuracies == pytest.approx(accuracies, abs=0)
    assert result.best_thresholds == pytest.approx(best, abs=0)
    np.testing.assert_allclose(result.tpr, tpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.fpr, fpr, rtol=0, atol=1e-15)
    assert result.val == pytest.approx(np.mean(vals), abs=1e-12)
    assert result.val_std == pytest.approx(np.std(vals), abs=1e-12)
    assert result.far == pytest.approx(np.mean(fars), abs=1e-12)
    assert 0.85 < result.accuracy < 0.99


def test_auc_and_eer_against_brute_force():
    rng = np.random.default_rng(1)
    issame = np.arange(300) % 2 == 0
    dist = np.round(np.where(issame, rng.normal(1.0, 0.4, 300), rng.normal(1.6, 0.4, 300)), 2)
    result = evaluate_distances(dist, issame)
    same, diff = dist[issame], dist[~issame]
    brute = np.mean((same[:, None] < diff[None, :]) + 0.5 * (same[:, None] == diff[None, :]))
    assert result.auc == pytest.approx(brute, abs=1e-12)
    # EER: at the threshold found, false rejects and false accepts are close, and about 1 - AUC-ish level.
    assert 0.1 < result.eer < 0.4


def test_flip_normalisation_and_xnorm_hand_computed():
    # Two pairs in 2-D. Pair 0: e1=(3,0), mirror (0,4) -> flip sum (3,4)/5; e2=(0,2), mirror (1.5,0) -> (1.5,2)/2.5.
    e1 = np.array([[3.0, 0.0], [1.0, 0.0]])
    e1f = np.array([[0.0, 4.0], [1.0, 0.0]])
    e2 = np.array([[0.0, 2.0], [0.0, 1.0]])
    e2f = np.array([[1.5, 0.0], [0.0, 1.0]])
    issame = np.array([True, False] * 1)
    e1 = np.tile(e1, (5, 1))
    e1f = np.tile(e1f, (5, 1))
    e2 = np.tile(e2, (5, 1))
    e2f = np.tile(e2f, (5, 1))
    issame = np.tile(issame, 5)
    report = evaluate_embeddings("toy", e1, e1f, e2, e2f, issame)
    # Flip: pair 0 identical directions (0.6, 0.8) -> distance 0; pair 1 orthogonal -> distance 2.
    # No flip: every distance is 2, nothing separates. Each fold is one pair; the 9 training pairs hold one
    # more of the other label, so the trained rule (all "different" or all "same") always misses: 0 %.
    assert report.flip.accuracy == 1.0
    assert report.no_flip.accuracy == 0.0
    norms = [3, 1, 4, 1, 2, 1, 1.5, 1]
    assert report.xnorm == pytest.approx(np.mean(norms))
    assert xnorm(np.array([[3.0, 4.0]]), np.array([[0.0, 1.0]])) == pytest.approx(3.0)
    lines = report.lines()
    assert lines[0] == f"[toy]XNorm: {np.mean(norms):f}"
    assert lines[2] == "[toy]Accuracy-Flip: 1.00000+-0.00000"


def test_interleaved_layout_and_roc_png(tmp_path):
    rng = np.random.default_rng(2)
    identities = rng.normal(size=(40, 16))
    issame = np.arange(40) % 2 == 0
    rows = []
    for i in range(40):
        a = identities[i] + 0.3 * rng.normal(size=16)
        b = (identities[i] if issame[i] else identities[(i + 7) % 40]) + 0.3 * rng.normal(size=16)
        rows += [a, b]
    embeddings = np.array(rows)
    report = evaluate_interleaved("synthetic", embeddings, embeddings * 0.5, issame)
    direct = evaluate_embeddings("synthetic", embeddings[0::2], embeddings[0::2] * 0.5, embeddings[1::2],
                                 embeddings[1::2] * 0.5, issame)
    assert report.to_dict() == direct.to_dict()
    assert report.flip.auc == 1.0 and report.flip.accuracy >= 0.95
    path = plot_roc([report], tmp_path / "roc" / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="3 distances but 2 labels"):
        evaluate_distances(np.zeros(3), np.zeros(2, bool))
