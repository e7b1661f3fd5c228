"""The estimator families the converter supports, each with small training data.

tests/converter/test_families.py proves parity for every entry; running this module
(``python -m tests.converter.families``) measures them and prints the support table
of docs/converter.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Data = tuple[Any, Any]


@dataclass(frozen=True)
class Family:
    name: str  # as in the support table
    make: Callable[[], Any]  # unfitted estimator
    data: str  # key of DATA


def _classification() -> Data:
    from sklearn.datasets import make_classification

    return make_classification(
        n_samples=300, n_features=6, n_informative=4, n_classes=3, random_state=1
    )


def _string_labels() -> Data:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x, np.array(["setosa", "versicolor", "virginica"])[y]


def _binary() -> Data:
    from sklearn.datasets import make_classification

    return make_classification(n_samples=300, n_features=6, random_state=2)


def _counts() -> Data:
    x, y = _classification()
    return np.abs(np.round(x * 3)), y


def _regression() -> Data:
    from sklearn.datasets import make_regression

    return make_regression(n_samples=300, n_features=6, noise=5.0, random_state=3)


def _columns() -> Data:
    import pandas as pd

    rng = np.random.default_rng(4)
    city = rng.choice(["Oslo", "Lima", "Pune", "Kyiv"], size=300)
    age = rng.uniform(18, 80, size=300).round(1)
    income = rng.normal(50, 15, size=300).round(2)
    y = np.where((age > 45) ^ np.isin(city, ["Oslo", "Pune"]), "yes", "no")
    return pd.DataFrame({"age": age, "city": city.astype(object), "income": income}), y


def _unlabelled() -> Data:
    x, _ = _classification()
    return x, None


DATA: dict[str, Callable[[], Data]] = {
    "classification": _classification,
    "string_labels": _string_labels,
    "binary": _binary,
    "counts": _counts,
    "regression": _regression,
    "columns": _columns,
    "unlabelled": _unlabelled,
}


def _columns_model(final: Any) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    ct = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "income"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    return Pipeline([("columns", ct), ("model", final)])


def _families() -> list[Family]:
    from sklearn import (
        cluster,
        decomposition,
        ensemble,
        linear_model,
        naive_bayes,
        neighbors,
        neural_network,
        pipeline,
        preprocessing,
        svm,
        tree,
    )

    scaled = preprocessing.StandardScaler
    return [
        Family("LogisticRegression", lambda: linear_model.LogisticRegression(max_iter=500), "classification"),
        Family("LogisticRegression, string labels", lambda: pipeline.make_pipeline(scaled(), linear_model.LogisticRegression(max_iter=500)), "string_labels"),
        Family("LogisticRegression, binary", linear_model.LogisticRegression, "binary"),
        Family("LinearRegression", linear_model.LinearRegression, "regression"),
        Family("Ridge", linear_model.Ridge, "regression"),
        Family("DecisionTreeClassifier", lambda: tree.DecisionTreeClassifier(max_depth=6, random_state=0), "classification"),
        Family("RandomForestClassifier", lambda: ensemble.RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0), "classification"),
        Family("RandomForestRegressor", lambda: ensemble.RandomForestRegressor(n_estimators=15, max_depth=6, random_state=0), "regression"),
        Family("ExtraTreesClassifier", lambda: ensemble.ExtraTreesClassifier(n_estimators=15, max_depth=6, random_state=0), "classification"),
        Family("ExtraTreesRegressor", lambda: ensemble.ExtraTreesRegressor(n_estimators=15, max_depth=6, random_state=0), "regression"),
        Family("GradientBoostingClassifier", lambda: ensemble.GradientBoostingClassifier(n_estimators=15, random_state=0), "classification"),
        Family("GradientBoostingRegressor", lambda: ensemble.GradientBoostingRegressor(n_estimators=15, random_state=0), "regression"),
        Family("HistGradientBoostingClassifier", lambda: ensemble.HistGradientBoostingClassifier(max_iter=15, random_state=0), "classification"),
        Family("HistGradientBoostingRegressor", lambda: ensemble.HistGradientBoostingRegressor(max_iter=15, random_state=0), "regression"),
        Family("SVC (RBF)", lambda: pipeline.make_pipeline(scaled(), svm.SVC()), "classification"),
        Family("SVC (linear, probability)", lambda: pipeline.make_pipeline(scaled(), svm.SVC(kernel="linear", probability=True, random_state=0)), "binary"),
        Family("SVR", lambda: pipeline.make_pipeline(scaled(), svm.SVR(C=100.0)), "regression"),
        Family("KNeighborsClassifier", lambda: neighbors.KNeighborsClassifier(n_neighbors=5), "classification"),
        Family("KNeighborsRegressor", lambda: neighbors.KNeighborsRegressor(n_neighbors=5), "regression"),
        Family("MLPClassifier", lambda: pipeline.make_pipeline(scaled(), neural_network.MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0)), "classification"),
        Family("MLPRegressor", lambda: pipeline.make_pipeline(scaled(), neural_network.MLPRegressor(hidden_layer_sizes=(16,), max_iter=300, random_state=0)), "regression"),
        Family("GaussianNB", naive_bayes.GaussianNB, "classification"),
        Family("MultinomialNB", naive_bayes.MultinomialNB, "counts"),
        Family("BernoulliNB", naive_bayes.BernoulliNB, "classification"),
        Family("KMeans", lambda: cluster.KMeans(n_clusters=3, n_init=2, random_state=0), "unlabelled"),
        Family("IsolationForest", lambda: ensemble.IsolationForest(n_estimators=20, random_state=0), "unlabelled"),
        Family("Pipeline(StandardScaler, PCA, LogisticRegression)", lambda: pipeline.make_pipeline(scaled(), decomposition.PCA(n_components=3), linear_model.LogisticRegression()), "classification"),
        Family("Pipeline(MinMaxScaler, RandomForestClassifier)", lambda: pipeline.make_pipeline(preprocessing.MinMaxScaler(), ensemble.RandomForestClassifier(n_estimators=10, random_state=0)), "classification"),
        Family("PCA (transformer)", lambda: decomposition.PCA(n_components=3), "unlabelled"),
        Family("ColumnTransformer(OneHotEncoder on strings) + LogisticRegression", lambda: _columns_model(linear_model.LogisticRegression(max_iter=500)), "columns"),
        Family("ColumnTransformer(OneHotEncoder on strings) + HistGradientBoosting", lambda: _columns_model(ensemble.HistGradientBoostingClassifier(max_iter=10)), "columns"),
    ]  # fmt: skip


FAMILIES = _families()


def fitted(family: Family) -> tuple[Any, Any]:
    """The fitted estimator and the data it was trained on (the parity sample)."""
    x, y = DATA[family.data]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of tiny training runs
        model = family.make().fit(x) if y is None else family.make().fit(x, y)
    return model, x


def support_table() -> str:
    """Markdown support table with the parity figures measured now."""
    import tempfile
    from pathlib import Path

    from agent.wire.errors import EdgeError
    from converter.package import build

    lines = [
        "| estimator | task | inputs | outputs | rows | max abs diff | skipped: ties, float32 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, family in enumerate(FAMILIES):
            model, x = fitted(family)
            try:
                r = build(model, name="t", version="1.0", out_dir=Path(tmp) / str(i), sample=x)
            except EdgeError as e:
                lines.append(f"| {family.name} | fails: {e} | | | | | |")
                continue
            m = r.manifest
            inputs = ", ".join(f"{s['name']} {s['datatype']}" for s in m["inputs"])
            outputs = ", ".join(s["name"] for s in m["outputs"])
            diffs = ", ".join(f"{k} {v:.1g}" for k, v in m["converter"]["max_abs_diff"].items())
            labels = " (labels exact)" if m["parity"]["exact"] else ""
            lines.append(
                f"| {family.name} | {m['task']} | {inputs} | {outputs} | {r.parity.rows} "
                f"| {diffs or '-'}{labels} | {r.parity.ties}, {r.parity.sensitive} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table())
