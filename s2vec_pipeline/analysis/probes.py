"""The probes: folds of the label rows, a ridge probe with its penalty chosen by inner
cross-validation on the training rows only, a small MLP probe, per-fold metrics, and the loop
that runs every method on every fold."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from s2vec_pipeline.analysis.evaluation_report import EvaluationReport, MethodResult
from s2vec_pipeline.cells import s2

#: Ridge penalties tried by the inner cross-validation (on standardized features).
RIDGE_ALPHAS = tuple(10.0**k for k in range(-3, 6))
INNER_FOLDS = 3

#: Per method: (feature matrix, or None for the training mean; PCA components, or None).
Features = dict[str, tuple[np.ndarray | None, int | None]]
#: Per protocol: (fold number of each row, block of each row for grouped inner folds, or None).
FoldPlan = dict[str, tuple[np.ndarray, np.ndarray | None]]


def assign_folds(
    ids: np.ndarray, folds: int, seed: int, block_level: int | None = None
) -> np.ndarray:
    """Fold number of each cell: random k-fold, or (with ``block_level``) whole level-N
    parents per fold, balanced in size (scikit-learn's ``KFold`` / ``GroupKFold``)."""
    from sklearn.model_selection import GroupKFold, KFold

    out = np.full(len(ids), -1, dtype=np.int64)
    if block_level is None:
        splitter = KFold(folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(ids)))
    else:
        groups = s2.to_signed(s2.parent(ids, block_level))
        splitter = GroupKFold(folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(ids)), groups=groups)
    for k, (_, test) in enumerate(splits):
        out[test] = k
    return out


# --- the probe ---------------------------------------------------------------------------


def select_alphas(
    x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Ridge penalty per target column of ``y`` with the least squared error over ``splits``.

    Each inner split standardizes on its own training rows (as the final pipeline does), and
    one SVD of those rows gives the ridge solution for every alpha at once: the grouped inner
    cross-validation scikit-learn's ``RidgeCV`` lacks (its fast path is leave-one-out, which
    leaks neighbouring cells into the spatial protocol's model selection).
    """
    alphas = np.asarray(RIDGE_ALPHAS)
    errors = np.zeros((len(alphas), y.shape[1]))
    for tr, va in splits:
        mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
        std[std == 0] = 1.0  # StandardScaler's rule for constant columns
        xt, xv = (x[tr] - mean) / std, (x[va] - mean) / std
        y_mean = y[tr].mean(axis=0)
        try:
            u, sv, vt = np.linalg.svd(xt, full_matrices=False)
        except np.linalg.LinAlgError:  # LAPACK's divide and conquer can fail; QR-based won't
            import scipy.linalg

            u, sv, vt = scipy.linalg.svd(xt, full_matrices=False, lapack_driver="gesvd")
        uty = u.T @ (y[tr] - y_mean)
        xv_v = xv @ vt.T
        for k, alpha in enumerate(alphas):
            pred = xv_v @ ((sv / (sv**2 + alpha))[:, None] * uty) + y_mean
            errors[k] += ((pred - y[va]) ** 2).sum(axis=0)
    return alphas[errors.argmin(axis=0)]


def _inner_splits(
    n_train: int, groups: np.ndarray | None, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, KFold

    n_groups = len(np.unique(groups)) if groups is not None else 0
    if groups is not None and n_groups >= 2:
        splitter = GroupKFold(min(INNER_FOLDS, n_groups), shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(n_train), groups=groups))
    k = min(INNER_FOLDS, n_train)
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n_train)))


def fit_predict(
    x: np.ndarray | None,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    inner_groups: np.ndarray | None,
    seed: int,
    pca_components: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(predictions for ``test``, ridge alpha per target) of a probe fitted on ``train``.

    ``y`` is (n, T). The probe is scikit-learn's standardize (→ PCA → standardize) → ridge,
    with one alpha per target chosen by ``select_alphas`` on inner folds of ``train`` (grouped
    like the outer folds when ``inner_groups`` is given). ``x`` None: the training mean.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if x is None:
        return np.broadcast_to(y[train].mean(axis=0), (len(test), y.shape[1])).copy(), None
    x_train = x[train]
    reduce = None
    keep = slice(None)
    if pca_components is not None:
        # PCA is fitted on the outer training fold only; the alpha search runs on its scores.
        # Components without variance (more requested than the features' rank) are dropped:
        # standardizing their rounding noise would swamp the solve.
        reduce = make_pipeline(StandardScaler(), PCA(pca_components, random_state=0))
        x_train = reduce.fit_transform(x_train)
        variance = reduce[-1].explained_variance_
        keep = variance > 1e-9 * max(float(variance.max()), 1e-300)
        x_train = x_train[:, keep]
        if x_train.shape[1] == 0:  # constant features on this fold: the probe is the mean
            return fit_predict(None, y, train, test, inner_groups, seed)
    alphas = select_alphas(x_train, y[train], _inner_splits(len(train), inner_groups, seed))
    probe = make_pipeline(StandardScaler(), Ridge(alpha=alphas))
    probe.fit(x_train, y[train])
    x_test = x[test] if reduce is None else reduce.transform(x[test])[:, keep]
    return probe.predict(x_test).reshape(len(test), -1), alphas


def fit_predict_mlp(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int
) -> np.ndarray:
    """A small MLP probe: standardized features → 64 ReLU units → standardized targets
    (scikit-learn's ``MLPRegressor``, L-BFGS, L2 penalty 1.0, at most 300 iterations: the
    full-batch solver suits these few-thousand-row probes far better than Adam)."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    net = MLPRegressor(
        hidden_layer_sizes=(64,), solver="lbfgs", alpha=1.0, max_iter=300, random_state=seed
    )
    probe = TransformedTargetRegressor(
        regressor=make_pipeline(StandardScaler(), net), transformer=StandardScaler()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: the fit is used as is
        probe.fit(x[train], y[train])
    return np.asarray(probe.predict(x[test])).reshape(len(test), -1)


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R², MAE and RMSE of one test fold (scikit-learn)."""
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    return {
        # R² needs two test rows (sklearn warns and returns NaN): say NaN without the warning
        "r2": float(r2_score(y_true, y_pred)) if len(y_true) >= 2 else float("nan"),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rmse": float(root_mean_squared_error(y_true, y_pred)),
    }


def run_probes(
    report: EvaluationReport, features: Features, fold_plan: FoldPlan, y_all: np.ndarray, seed: int
) -> None:
    """Every method on every fold of every protocol, appended to ``report.results``."""
    target_names = report.targets
    for protocol, (fold_of, grp) in fold_plan.items():
        for method, (x, pca) in features.items():
            per_fold: list[list[dict[str, Any]]] = [[] for _ in target_names]
            for k in range(int(fold_of.max()) + 1):
                train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
                n_comp = None if pca is None else max(1, min(pca, x.shape[1], len(train) - 1))
                inner_groups = None if grp is None else grp[train]
                if method.endswith("_mlp"):
                    pred, alphas = fit_predict_mlp(x, y_all, train, test, seed), None
                else:
                    pred, alphas = fit_predict(x, y_all, train, test, inner_groups, seed, n_comp)
                for t in range(len(target_names)):
                    per_fold[t].append(
                        {
                            **fold_metrics(y_all[test, t], pred[:, t]),
                            "alpha": None if alphas is None else float(alphas[t]),
                            "n_test": len(test),
                        }
                    )
            width = 0 if x is None else min(pca or x.shape[1], x.shape[1])
            for t, target in enumerate(target_names):
                report.results.append(MethodResult(target, protocol, method, width, per_fold[t]))
    report.results.sort(key=lambda r: target_names.index(r.target))  # stable: keeps order
