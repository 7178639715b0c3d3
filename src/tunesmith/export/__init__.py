"""Exporting trained runs: `tunesmith export RUN_DIR --format onnx [--quantize int8] OUT` (onnx.py), and loading an
export back as a run the server can answer with (`tunesmith serve --backend onnx`)."""
