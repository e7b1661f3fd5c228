"""edge-model: turn a fitted scikit-learn model into a signed ONNX model package."""
