"""BNMLPClassifier / BNMLPRegressor against scikit-learn's MLPClassifier / MLPRegressor
at equal budgets (``max_iter`` epochs), each with its DEFAULT settings otherwise
(hidden (100,), Adam, batch min(200, n); learning rate 1e-2 with batch norm, 1e-3
without), on scikit-learn's estimator-check data and on data sets it ships.

    python bench/mlp_vs_sklearn.py [--seeds 5] [--budgets 20,50,200]

Scores: R^2 (regression) or accuracy; the mean over seeds and [min, max]. The check
data are scored on the training data, as ``check_regressors_train`` /
``check_classifiers_train`` do (they require > 0.5 and > 0.83); the real data sets on
a held-out 25 % split (features standardised with the training split; regression
targets too).
"""

import argparse
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, make_blobs
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.preprocessing import StandardScaler, scale
from sklearn.utils.estimator_checks import _regression_dataset

from numbabn.sklearn import BNMLPClassifier, BNMLPRegressor


def datasets():
    X, y = _regression_dataset()
    y = scale(y)
    yield "check_regressors_train data (train R^2)", "reg", X, X, y, y
    X, y = make_blobs(n_samples=300, random_state=0)
    X = StandardScaler().fit_transform(X)
    yield "check_classifiers_train blobs (train acc.)", "clf", X, X, y, y
    X, y = load_digits(return_X_y=True)
    yield ("digits (test acc.)", "clf", *train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y))
    X, y = load_breast_cancer(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    s = StandardScaler().fit(X_tr)
    yield "breast_cancer (test acc.)", "clf", s.transform(X_tr), s.transform(X_te), y_tr, y_te
    X, y = load_diabetes(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0)
    s, m, sd = StandardScaler().fit(X_tr), y_tr.mean(), y_tr.std()
    yield "diabetes (test R^2)", "reg", s.transform(X_tr), s.transform(X_te), (y_tr - m) / sd, (y_te - m) / sd


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", default="20,50,200")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    warnings.filterwarnings("ignore")
    print("| data (score) | max_iter | sklearn MLP | numbabn BN-MLP |\n|---|---:|---:|---:|")
    for name, kind, X_tr, X_te, y_tr, y_te in datasets():
        ours, theirs = (BNMLPRegressor, MLPRegressor) if kind == "reg" else (BNMLPClassifier, MLPClassifier)
        for budget in budgets:
            cells = []
            for cls in (theirs, ours):
                scores = [
                    cls(max_iter=budget, random_state=s).fit(X_tr, y_tr).score(X_te, y_te) for s in range(args.seeds)
                ]
                cells.append(f"{np.mean(scores):.3f} [{min(scores):.3f}, {max(scores):.3f}]")
            print(f"| {name} | {budget} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
