#!/usr/bin/env python3
"""Build the bundled demo package: iris, string labels, unsigned, name "iris", 1.0.0.

`edge-agent demo` installs it from agent/demo/iris/ with no set-up. Rebuild it with
`.venv/bin/python scripts/build-demo-model.py` after a converter change and commit
the result (a few KB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converter.package import build  # noqa: E402


def demo_estimator() -> object:
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "agent" / "demo" / "iris")
    args = parser.parse_args()
    from sklearn.datasets import load_iris

    # The iris rows themselves are the parity sample: the demo's stored vectors are
    # real flowers a user can recognise in the manifest.
    result = build(
        demo_estimator(),
        name="iris",
        version="1.0.0",
        out_dir=args.output,
        sample=load_iris().data,
    )
    print(f"wrote {result.path}: {result.size} bytes, parity {result.parity.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
