"""edge-agent: serve scikit-learn models converted to ONNX on small Linux devices."""

from __future__ import annotations

__version__ = "0.1.0"
