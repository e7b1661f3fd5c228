"""The classic baseline: Flask + joblib + scikit-learn, ``model.predict(data['features'])``.

    python bench/flask_baseline.py MODEL.joblib PORT

Flask's own threaded server, as most such services are first deployed.
"""

from __future__ import annotations

import os
import sys

# This folder holds bench/http.py: keep it off the import path so that it never
# shadows the standard library's http package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import logging
import sys

import joblib
from flask import Flask, jsonify, request

model = joblib.load(sys.argv[1])
app = Flask(__name__)
logging.getLogger("werkzeug").setLevel(logging.ERROR)


@app.post("/predict")
def predict() -> object:
    data = request.get_json()
    return jsonify({"prediction": model.predict(data["features"]).tolist()})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
