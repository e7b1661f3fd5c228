"""edge-model convert as a user runs it: reports, samples, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from tests.converter.conftest import assert_one_line_error, run
from tests.fixtures.models import Keypair

EDGE_MODEL = Path(sys.executable).parent / "edge-model"


# --- convert ------------------------------------------------------------------------


def test_convert_reports_inputs_outputs_classes_and_parity(
    capsys: pytest.CaptureFixture[str], iris_joblib: Path, keypair: Keypair, tmp_path: Path
) -> None:
    code, out, err = run(
        capsys, "convert", iris_joblib, "--name", "iris", "--version", "2.0.0",
        "--key", keypair.key, "-o", tmp_path / "out", "--serial", "7",
    )  # fmt: skip
    assert code == 0, err
    assert "inputs:  input FP32 [-1, 4]" in out
    assert "outputs: label BYTES [-1], probabilities FP32 [-1, 3]" in out
    assert "classes: setosa, versicolor, virginica" in out
    assert "parity:  256 rows" in out and "label: 0 differ" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"], manifest["serial"]) == ("iris", "2.0.0", 7)
    assert manifest["signature"]["alg"] == "ed25519"


def test_convert_with_csv_sample_of_named_columns(
    capsys: pytest.CaptureFixture[str], columns_estimator: Any, columns_frame: Any, tmp_path: Path
) -> None:
    model = tmp_path / "columns.joblib"
    joblib.dump(columns_estimator, model)
    sample = tmp_path / "sample.csv"
    columns_frame[["age", "city"]].to_csv(sample, index=False)
    code, out, err = run(
        capsys, "convert", model, "--name", "columns", "--version", "1.0", "--sample", sample,
        "-o", tmp_path / "pkg",
    )  # fmt: skip
    assert code == 0, err
    assert "inputs:  age FP32 [-1, 1], city BYTES [-1, 1]" in out
    assert "200 rows" in out and "sample rows" in out
    parity = json.loads((tmp_path / "pkg" / "manifest.json").read_text())["parity"]
    assert all(isinstance(v[0], str) for v in parity["inputs"]["city"])


def test_convert_with_npy_sample(
    capsys: pytest.CaptureFixture[str], iris_joblib: Path, iris_data: Any, tmp_path: Path
) -> None:
    np.save(tmp_path / "rows.npy", iris_data[0])
    code, out, err = run(
        capsys, "convert", iris_joblib, "--name", "iris", "--version", "1.0",
        "--sample", tmp_path / "rows.npy", "-o", tmp_path / "pkg",
    )  # fmt: skip
    assert code == 0, err
    assert "150 rows" in out


def test_convert_skops_file(
    capsys: pytest.CaptureFixture[str], regressor_estimator: Any, tmp_path: Path
) -> None:
    import skops.io

    skops.io.dump(regressor_estimator, tmp_path / "ridge.skops")
    code, out, err = run(
        capsys, "convert", tmp_path / "ridge.skops", "--name", "ridge", "--version", "1.0",
        "-o", tmp_path / "pkg",
    )  # fmt: skip
    assert code == 0, err
    assert "outputs: variable FP32 [-1, 1]" in out


class CustomScaler(StandardScaler):
    """A user's own class: skops must not load it unless told to trust it."""


def test_skops_file_with_an_untrusted_type(
    capsys: pytest.CaptureFixture[str], regression_data: Any, tmp_path: Path
) -> None:
    import skops.io
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(CustomScaler(), Ridge()).fit(*regression_data)
    path = tmp_path / "custom.skops"
    skops.io.dump(model, path)
    code, _, err = run(capsys, "convert", path, "--name", "c", "--version", "1", "-o", tmp_path)
    assert code == 1
    type_name = f"{__name__}.CustomScaler"
    assert_one_line_error(err, "not trusted", type_name, "--trust")
    # Trusted, it loads; skl2onnx has no converter for the custom class, and says so.
    code, _, err = run(
        capsys, "convert", path, "--trust", type_name, "--name", "c", "--version", "1",
        "-o", tmp_path / "out",
    )  # fmt: skip
    assert code == 1
    assert_one_line_error(err, "cannot convert CustomScaler")


# --- bad input: one line, exit 1 ---------------------------------------------------


def test_missing_model_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "convert", tmp_path / "nope.joblib", "--name", "a", "--version", "1", "-o", tmp_path
    )
    assert code == 1
    assert_one_line_error(err, "nope.joblib", "does not exist")


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_a_name_that_is_not_a_plain_path_component_is_refused(
    capsys: pytest.CaptureFixture[str], iris_joblib: Path, tmp_path: Path, name: str
) -> None:
    code, _, err = run(
        capsys, "convert", iris_joblib, "--name", name, "--version", "1", "-o", tmp_path / "o"
    )
    assert code == 1
    assert_one_line_error(err, f"name: {name!r} is not a plain name")
    assert not (tmp_path / "o").exists()


def test_file_that_is_not_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.pkl"
    junk.write_text("this is not a pickle\n")
    code, _, err = run(capsys, "convert", junk, "--name", "a", "--version", "1", "-o", tmp_path)
    assert code == 1
    assert_one_line_error(err, "junk.pkl", "not a joblib or pickle file")


def test_pickle_of_something_else(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    code, _, err = run(capsys, "convert", path, "--name", "a", "--version", "1", "-o", tmp_path)
    assert code == 1
    assert_one_line_error(err, "builtins.dict", "not a scikit-learn estimator")


def test_unfitted_estimator(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    path = tmp_path / "unfitted.joblib"
    joblib.dump(RandomForestClassifier(), path)
    code, _, err = run(capsys, "convert", path, "--name", "a", "--version", "1", "-o", tmp_path)
    assert code == 1
    assert_one_line_error(err, "RandomForestClassifier is not fitted")


def test_unsupported_estimator_is_named(
    capsys: pytest.CaptureFixture[str], regression_data: Any, tmp_path: Path
) -> None:
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    path = tmp_path / "kr.joblib"
    joblib.dump(make_pipeline(StandardScaler(), KernelRidge()).fit(*regression_data), path)
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "convert", path, "--name", "a", "--version", "1", "-o", out_dir)
    assert code == 1
    assert_one_line_error(err, "cannot convert KernelRidge", "docs/converter.md")
    assert not out_dir.exists()


def test_sample_with_wrong_columns(
    capsys: pytest.CaptureFixture[str], columns_estimator: Any, tmp_path: Path
) -> None:
    model = tmp_path / "columns.joblib"
    joblib.dump(columns_estimator, model)
    sample = tmp_path / "sample.csv"
    sample.write_text("age,town\n30,Oslo\n")
    code, _, err = run(
        capsys, "convert", model, "--name", "c", "--version", "1", "--sample", sample,
        "-o", tmp_path / "out",
    )  # fmt: skip
    assert code == 1
    assert_one_line_error(err, "sample: columns", "missing ['city']", "unexpected ['town']")


def test_npy_sample_with_wrong_width(
    capsys: pytest.CaptureFixture[str], iris_joblib: Path, tmp_path: Path
) -> None:
    np.save(tmp_path / "rows.npy", np.zeros((5, 3)))
    code, _, err = run(
        capsys, "convert", iris_joblib, "--name", "i", "--version", "1",
        "--sample", tmp_path / "rows.npy", "-o", tmp_path / "out",
    )  # fmt: skip
    assert code == 1
    assert_one_line_error(err, "sample: shape [5, 3]", "4 features")


def test_missing_key(capsys: pytest.CaptureFixture[str], iris_joblib: Path, tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "convert", iris_joblib, "--name", "i", "--version", "1",
        "--key", tmp_path / "absent.key", "-o", tmp_path / "out",
    )  # fmt: skip
    assert code == 1
    assert_one_line_error(err, "private key", "absent.key")


def test_bad_name_and_version(
    capsys: pytest.CaptureFixture[str], iris_joblib: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "convert", iris_joblib, "--name", "bad name", "--version", "1", "-o", tmp_path
    )
    assert code == 1
    assert_one_line_error(err, "name: 'bad name'")
    code, _, err = run(
        capsys, "convert", iris_joblib, "--name", "ok", "--version", "v1", "-o", tmp_path
    )
    assert code == 1
    assert_one_line_error(err, "version: 'v1'")


def test_verbose_shows_the_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "convert", tmp_path / "x.joblib", "--name", "a", "--version", "1",
        "-o", tmp_path, "--verbose",
    )  # fmt: skip
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("edge-model: error:")


def test_bad_usage_exits_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "convert")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and "run code" in out


# --- the installed console script --------------------------------------------------


@pytest.mark.slow
def test_console_script_converts_and_verifies(
    iris_joblib: Path, keypair: Keypair, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:converter"}
    done = subprocess.run(
        [str(EDGE_MODEL), "convert", str(iris_joblib), "--name", "iris", "--version", "3.0.0",
         "--key", str(keypair.key), "-o", str(tmp_path / "pkg")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "classes: setosa, versicolor, virginica" in done.stdout
    done = subprocess.run(
        [str(EDGE_MODEL), "verify", str(tmp_path / "pkg"), "--pub", str(keypair.pub)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [str(EDGE_MODEL), "convert", str(tmp_path / "missing.joblib"), "--name", "x",
         "--version", "1", "-o", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_output_into_a_closed_pipe_exits_quietly(package: Path) -> None:
    # `edge-model inspect --json pkg | head`: the reader is gone before the write.
    proc = subprocess.Popen(
        [str(EDGE_MODEL), "inspect", "--json", str(package)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141  # as if killed by SIGPIPE, like coreutils
    assert err == ""
