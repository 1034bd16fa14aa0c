"""The method itself, as tensor functions: patch scores from attention (`scoring`), patch
selection (`selection`), uncertainty and the gate (`uncertainty`), accuracy (`metrics`).

torch only: no models, data, devices, service or HTTP (an import-linter contract in
pyproject.toml checks it), so every caller, the exported ONNX graph included, runs the
same arithmetic.
"""
