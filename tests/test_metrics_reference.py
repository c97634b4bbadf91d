"""The reported numbers against independent ones: metrics worked out by hand, C chosen by scikit-learn alone."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.data.manifest import Row
from pipeline.extract.cache import CacheWriter, cache_attrs
from pipeline.heads.model import head_path, load_head
from pipeline.heads.train import train_head
from pipeline.metrics import head_metrics, per_class_rows

# ------------------------------------------------------------ worked by hand

# Ten test images of four classes. Rows: true class; columns: predicted class.
#
#            pred 0  pred 1  pred 2  pred 3 | support  recall
#   true 0      3       1       0       0   |    4      3/4
#   true 1      1       2       0       0   |    3      2/3
#   true 2      0       1       1       0   |    2      1/2
#   true 3      1       0       0       0   |    1      0
#   predicted   5       4       1       0
#   precision  3/5     2/4     1/1     0 (never predicted: 0 by zero_division)
#
# accuracy            = (3 + 2 + 1 + 0) / 10                 = 0.6
# mean_class_accuracy = (3/4 + 2/3 + 1/2 + 0) / 4 = (36 + 32 + 24 + 0) / 192 = 23/48 = 0.479166...
# F1 = 2 TP / (2 TP + FP + FN):
#   class 0: 6 / (6 + 2 + 1) = 2/3;  class 1: 4 / (4 + 2 + 1) = 4/7
#   class 2: 2 / (2 + 0 + 1) = 2/3;  class 3: 0 / (0 + 0 + 1) = 0
# macro_f1            = (2/3 + 4/7 + 2/3 + 0) / 4 = (40/21) / 4 = 10/21 = 0.476190...
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
Y_PRED = [0, 0, 0, 1, 1, 1, 0, 2, 1, 0]
# Scores whose argmax is Y_PRED; the rank of the true class, no ties:
SCORES = [
    [0.70, 0.10, 0.15, 0.05],  # true 0: rank 1
    [0.60, 0.20, 0.15, 0.05],  # true 0: rank 1
    [0.50, 0.30, 0.15, 0.05],  # true 0: rank 1
    [0.30, 0.50, 0.15, 0.05],  # true 0: rank 2
    [0.10, 0.60, 0.25, 0.05],  # true 1: rank 1
    [0.20, 0.70, 0.06, 0.04],  # true 1: rank 1
    [0.50, 0.15, 0.30, 0.05],  # true 1: rank 3 (behind 0 and 2)
    [0.10, 0.15, 0.70, 0.05],  # true 2: rank 1
    [0.10, 0.60, 0.25, 0.05],  # true 2: rank 2
    [0.40, 0.30, 0.20, 0.10],  # true 3: rank 4
]
# top2_accuracy: ranks <= 2: all but the rank-3 and rank-4 rows = 8/10 = 0.8
# top3_accuracy: ranks <= 3: all but the rank-4 row             = 9/10 = 0.9
# top5: not reported with 4 classes (k must be below the number of classes).


def test_head_metrics_match_the_hand_computed_confusion():
    assert (np.argmax(SCORES, 1) == Y_PRED).all()  # the table above is self-consistent
    m = head_metrics(Y_TRUE, Y_PRED, np.array(SCORES), 4, top_k=(2, 3, 5))
    assert set(m) == {"accuracy", "mean_class_accuracy", "top2_accuracy", "top3_accuracy", "macro_f1", "n_test"}
    assert m["accuracy"] == pytest.approx(0.6, abs=1e-12)
    assert m["mean_class_accuracy"] == pytest.approx(23 / 48, abs=1e-12)
    assert m["macro_f1"] == pytest.approx(10 / 21, abs=1e-12)
    assert m["top2_accuracy"] == pytest.approx(0.8, abs=1e-12)
    assert m["top3_accuracy"] == pytest.approx(0.9, abs=1e-12)
    assert m["n_test"] == 10
    # The defaults (3, 5): top-3 only, since 4 classes leave no top-5.
    assert "top3_accuracy" in head_metrics(Y_TRUE, Y_PRED, np.array(SCORES), 4)
    assert "top5_accuracy" not in head_metrics(Y_TRUE, Y_PRED, np.array(SCORES), 4)


def test_per_class_rows_match_the_hand_computed_confusion():
    rows = per_class_rows("h", Y_TRUE, Y_PRED, ["a", "b", "c", "d"])
    # head, class, support, recall, precision, F1 (rounded to 6 places), from the table above.
    expected = [
        ["h", "a", 4, 3 / 4, 3 / 5, 2 / 3],
        ["h", "b", 3, 2 / 3, 2 / 4, 4 / 7],
        ["h", "c", 2, 1 / 2, 1 / 1, 2 / 3],
        ["h", "d", 1, 0.0, 0.0, 0.0],
    ]
    assert [r[:3] for r in rows] == [e[:3] for e in expected]
    np.testing.assert_allclose([r[3:] for r in rows], [e[3:] for e in expected], atol=1e-6)


# ------------------------------------------- C chosen as scikit-learn chooses it

GRIDS = {"logreg": [0.001, 0.01, 0.1, 1.0, 10.0], "svm": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]}
MAX_ITER = {"logreg": 2000, "svm": 10000}
ESTIMATORS = {"logreg": LogisticRegression, "svm": LinearSVC}
FOLDS, SEED = 3, 0


def _cache(path):
    """A cache written by the project's one writer: 60 train rows of three classes, 30 test rows.

    Class k lifts feature k a little above Gaussian noise, so the C grid
    matters (found once: each grid below has one best C, not its first). The
    test rows carry shuffled labels: a head that read them would score otherwise.
    """
    rng = np.random.default_rng(3)
    n, dim = 60, 32
    y = np.arange(n) % 3
    X = rng.normal(size=(n, dim)).astype("f4")
    X[np.arange(n), y] += 1.2
    X_test = rng.normal(size=(30, dim)).astype("f4")
    y_test = rng.permutation(np.arange(30) % 3)
    rows = [Row(f"{c}/{i}.jpg", int(c), "train", f"{i:064x}") for i, c in enumerate(y)]
    rows += [Row(f"{c}/t{i}.jpg", int(c), "test", f"{n + i:064x}") for i, c in enumerate(y_test)]
    # Test rows first: the train split must be picked out by split, not by position.
    order = list(range(n, n + 30)) + list(range(n))
    features = np.concatenate([X, X_test])[order]
    prov = {"backbone": "b", "weights": "w", "weights_sha256": "", "transform": "t"}
    spec = {"resize": 36, "crop": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    with CacheWriter(path, dim, cache_attrs(prov, ["a", "b", "c"], "pillow", "fp32", dim, preprocessing=spec)) as w:
        w.append(features, [rows[i] for i in order])
    return X, y


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_train_head_chooses_C_as_an_independent_grid_search_does(tmp_path, name):
    X, y = _cache(tmp_path / "f.h5")
    estimator = ESTIMATORS[name](max_iter=MAX_ITER[name], random_state=SEED)
    reference = GridSearchCV(
        Pipeline([("scale", StandardScaler()), ("clf", estimator)]),
        {"clf__C": GRIDS[name]},
        cv=StratifiedKFold(FOLDS, shuffle=True, random_state=SEED),
        scoring="accuracy",
    ).fit(X, y)
    means = reference.cv_results_["mean_test_score"]
    # The data make the choice mean something: one best C, neither the grid's first nor a tie.
    assert reference.best_index_ != 0 and (means == means.max()).sum() == 1, means

    summary = train_head(name=name, features_file=tmp_path / "f.h5", heads_dir=tmp_path / "heads",
                         C=GRIDS[name], max_iter=MAX_ITER[name], cv_folds=FOLDS, seed=SEED)

    assert summary["best_C"] == reference.best_params_["clf__C"], (summary, means)
    assert summary["cv_accuracy"] == round(float(reference.best_score_), 6), (summary, means)
    assert summary["n_train"] == 60
    # The saved head is the reference's refit on the whole train split.
    saved, config = load_head(head_path(tmp_path / "heads", name))
    assert config["head"]["best_C"] == summary["best_C"] and config["classes"] == ["a", "b", "c"]
    probe = np.random.default_rng(1).normal(size=(5, X.shape[1])).astype("f4")
    np.testing.assert_allclose(saved.decision_function(probe), reference.decision_function(probe), rtol=1e-6, atol=1e-8)
