"""POST /predict through the routes and the inference core, in process: rows, named
columns, probabilities, every bad input. (The transport has its own tests in test_http.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.agent.serving.stack import Served, serve
from tests.fixtures.rows import all_rows


@pytest.fixture
def iris(tmp_path: Path, iris_package: Path) -> Any:
    with serve(tmp_path, iris_package, transport=False) as served:
        yield served


def test_rows_answer_the_scikit_learn_labels(
    iris: Served, iris_data: Any, iris_estimator: Any
) -> None:
    x, _ = iris_data
    rows = x[::15].tolist()
    r = iris.client().predict({"features": rows})
    assert r.status == 200, r.body
    body = r.json
    assert body["prediction"] == iris_estimator.predict(x[::15]).tolist()
    assert all(isinstance(p, str) for p in body["prediction"])
    assert (body["model"], body["version"]) == ("iris", "1.0.0")
    assert "probabilities" not in body


def test_probabilities_come_with_the_classes(
    iris: Served, iris_data: Any, iris_estimator: Any
) -> None:
    x, _ = iris_data
    r = iris.client().predict({"features": x[:3].tolist(), "probabilities": True})
    body = r.json
    assert body["classes"] == ["setosa", "versicolor", "virginica"]
    np.testing.assert_allclose(
        body["probabilities"], iris_estimator.predict_proba(x[:3]), atol=1e-5
    )


def test_named_rows_map_through_feature_names(
    tmp_path: Path, make_package: Any, iris_data: Any
) -> None:
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    x, y = iris_data
    names = ["sepal_l", "sepal_w", "petal_l", "petal_w"]
    est = LogisticRegression(max_iter=500).fit(pd.DataFrame(x, columns=names), y)
    pkg = make_package(est, "named", "1.0.0")
    with serve(tmp_path, pkg, transport=False) as served:
        c = served.client()
        row = dict(zip(names, x[100].tolist(), strict=True))
        assert c.predict({"features": [row]}).json["prediction"] == [y[100]]
        bad = c.predict({"features": [{k: v for k, v in row.items() if k != "petal_w"}]})
        assert bad.status == 400
        assert bad.error.startswith("features[0]: missing column 'petal_w'")


def test_regressor_answers_one_number_per_row(
    tmp_path: Path, regressor_package: Path, regression_data: Any, regressor_estimator: Any
) -> None:
    x, _ = regression_data
    with serve(tmp_path, regressor_package, transport=False) as served:
        body = served.client().predict({"features": x[:4].tolist()}).json
        assert len(body["prediction"]) == 4
        assert all(isinstance(v, float) for v in body["prediction"])
        np.testing.assert_allclose(
            body["prediction"], regressor_estimator.predict(x[:4]), rtol=1e-4
        )
        r = served.client().predict({"features": x[:1].tolist(), "probabilities": True})
        assert r.status == 400
        assert "probabilities: model 'ridge' has no probabilities output" in r.error


def test_named_columns_for_a_column_transformer(
    tmp_path: Path, columns_package: Path, columns_frame: Any, columns_estimator: Any
) -> None:
    frame = columns_frame[["age", "city"]].iloc[:6]
    rows = [
        {"age": float(a), "city": str(c)} for a, c in zip(frame["age"], frame["city"], strict=True)
    ]
    with serve(tmp_path, columns_package, transport=False) as served:
        c = served.client()
        r = c.predict({"features": rows})
        assert r.status == 200, r.body
        assert r.json["prediction"] == columns_estimator.predict(frame).tolist()
        # Rows as lists in input order are accepted too.
        as_lists = c.predict({"features": [[row["age"], row["city"]] for row in rows]})
        assert as_lists.json["prediction"] == r.json["prediction"]

        missing = c.predict({"features": [{"age": 3}]})
        assert missing.status == 400
        assert missing.error == "features[0]: missing column 'city' (expected columns: age, city)"
        extra = c.predict({"features": [{"age": 3, "city": "Oslo", "zip": "0150"}]})
        assert extra.status == 400
        assert extra.error == "features[0]: unknown column 'zip' (expected columns: age, city)"
        wrong_type = c.predict({"features": [rows[0], {"age": "old", "city": "Oslo"}]})
        assert wrong_type.status == 400
        assert wrong_type.error == "features[1][0] (age): expected a number, got 'old'"
        number_city = c.predict({"features": [{"age": 30, "city": 7}]})
        assert number_city.error == "features[0][1] (city): expected a string, got 7"
        nan = c.predict(b'{"features": [{"age": NaN, "city": "Oslo"}]}')
        assert nan.status == 400
        assert nan.error.startswith("features[0][0] (age): nan is not a finite number")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"features": [[1, 2, 3, 4], [1, 2, 3]]}, "features[1]: expected 4 numbers, got 3"),
        ({"features": [[1, 2, 3, 4, 5]]}, "features[0]: expected 4 numbers, got 5"),
        ({"features": [[1, 2, True, 4]]}, "features[0][2]: expected a number, got True"),
        ({"features": [[1, 2, "3", 4]]}, "features[0][2]: expected a number, got '3'"),
        ({"features": [[1, 2, None, 4]]}, "features[0][2]: expected a number, got None"),
        ({"features": [1, 2, 3, 4]}, "features[0]: expected a list of 4 values, got 1"),
        ({"features": []}, "features: expected at least one row, got an empty list"),
        ({"features": "1,2,3,4"}, "features: expected a list of rows, got a string"),
        (
            {"rows": [[1, 2, 3, 4]]},
            "rows: unknown field (expected 'features', 'probabilities', 'request_id')",
        ),
        ({}, "features: missing (expected a list of rows)"),
        ([[1, 2, 3, 4]], "body: expected a JSON object with 'features', got a list"),
        (
            {"features": [[1, 2, 3, 4]], "probabilities": "yes"},
            "probabilities: expected true or false, got 'yes'",
        ),
        ({"features": [[1e300, 2, 3, 4]]}, "features[0][0]: 1e+300 is not a finite number"),
    ],
)
def test_bad_rows_are_400_naming_the_field(iris: Served, body: Any, expected: str) -> None:
    r = iris.client().predict(body)
    assert r.status == 400, r.body
    assert r.error.startswith(expected), r.error


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_naming_row_and_column(iris: Served, literal: str) -> None:
    body = f'{{"features": [[1, 2, 3, 4], [5, {literal}, 7, 8]]}}'.encode()
    r = iris.client().predict(body)
    assert r.status == 400
    assert r.error.startswith("features[1][1]: ")
    assert "does not accept NaN or infinity" in r.error


def test_invalid_json_names_the_position(iris: Served) -> None:
    r = iris.client().predict(b'{"features": [[1, 2, 3, 4]')
    assert r.status == 400
    assert r.error.startswith("body: invalid JSON at line 1 column 27 (char 26)")


def test_model_is_picked_by_query_and_unknown_is_404(
    tmp_path: Path, iris_package: Path, regressor_package: Path
) -> None:
    with serve(tmp_path, iris_package, regressor_package, transport=False) as served:
        c = served.client()
        first = c.predict({"features": [[1, 2, 3, 4]]})  # no name: the first installed
        assert (first.status, first.json["model"]) == (200, "iris")
        assert c.predict({"features": [[1, 2, 3, 4]]}, "?model=iris").json["model"] == "iris"
        ridge = c.predict({"features": [[1, 2, 3, 4, 5]]}, "?model=ridge")
        assert ridge.json["model"] == "ridge"
        unknown = c.predict({"features": [[1, 2, 3, 4]]}, "?model=nope")
        assert unknown.status == 404
        assert unknown.error == "model 'nope' is not installed"


def test_default_model_from_config(
    tmp_path: Path, iris_package: Path, regressor_package: Path
) -> None:
    with serve(
        tmp_path, iris_package, regressor_package, default="ridge", transport=False
    ) as served:
        assert served.client().predict({"features": [[1, 2, 3, 4, 5]]}).json["model"] == "ridge"


def test_no_model_is_503(tmp_path: Path) -> None:
    with serve(tmp_path, transport=False) as served:
        r = served.client().predict({"features": [[1, 2, 3, 4]]})
        assert r.status == 503
        assert r.error == "no model is loaded yet (none is installed: `edge-agent install PACKAGE`)"


def test_the_503_says_why_no_model_serves(tmp_path: Path) -> None:
    with serve(tmp_path, transport=False) as served:
        served.registry.set_state("iris", "not_in_rollout", "not in rollout (bucket 52 >= 50%)")
        r = served.client().predict({"features": [[1, 2, 3, 4]]})
        assert r.status == 503
        assert r.error == "no model is loaded yet (iris: not in rollout (bucket 52 >= 50%))"
        named = served.client().request("GET", "/v2/models/iris")
        assert named.status == 404
        assert named.error == "model 'iris' is not installed (not in rollout (bucket 52 >= 50%))"


def test_every_answered_prediction_is_in_the_buffer(iris: Served) -> None:
    c = iris.client()
    answers = [c.predict({"features": [[5.1, 3.5, 1.4, 0.2 + i / 10]]}).json for i in range(5)]
    c.predict({"features": [[1, 2]]})  # refused: not recorded
    rows = all_rows(iris.buffer)
    assert len(rows) == 5
    for row, answer, i in zip(rows, answers, range(5), strict=True):
        assert (row.model, row.version) == ("iris", "1.0.0")
        assert json.loads(row.inputs) == [[5.1, 3.5, 1.4, 0.2 + i / 10]]
        assert json.loads(row.outputs) == {"prediction": answer["prediction"]}
        assert 0 < row.latency_ms < 1000
