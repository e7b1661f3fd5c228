"""Build the two signed iris packages the device e2e installs and publishes.

    python scripts/e2e/make-packages.py OUTDIR

Writes OUTDIR/keys/publisher.{key,pub}, OUTDIR/iris-1.0.0/, OUTDIR/iris-1.1.0/ (real
converter output, signed, serials 1 and 2) and OUTDIR/expected.json: rows to send to
/predict and the labels scikit-learn itself gives for them, per version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from agent.wire.signing import generate_keypair, load_private_key
from converter.package import build_package

NAMES = np.array(["setosa", "versicolor", "virginica"])


def main(out: Path) -> None:
    x, y = load_iris(return_X_y=True)
    labels = NAMES[y]
    key, _pub = generate_keypair(out / "keys")
    private = load_private_key(key)
    rows = x[[0, 50, 100, 70, 133]]
    expected: dict[str, object] = {"rows": rows.tolist()}
    # C differs so the two versions are different models, as a real update would be.
    for serial, (version, c) in enumerate([("1.0.0", 1.0), ("1.1.0", 0.05)], start=1):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
        model.fit(x, labels)
        build_package(
            model,
            name="iris",
            version=version,
            out_dir=out / f"iris-{version}",
            private_key=private,
            serial=serial,
        )
        expected[version] = model.predict(rows).tolist()
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    print(json.dumps(expected))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
