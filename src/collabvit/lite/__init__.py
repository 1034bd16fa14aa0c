"""What runs without torch: the edge's side of collabvit on a device.

numpy, Pillow, pydantic and httpx only (onnxruntime imported where the ONNX edge runs):
the specs and command configs (`config`), the wire format and the Open Inference Protocol
bodies (`protocol`, `arrays`), the edge's HTTP client (`client`), the budget controllers
and their frontiers (`controller`, `frontier`), the exported edge (`onnx_edge`), the
figures (`summary`), the Fashion-MNIST readers and canvases (`fashion`, `cluttered`) and
progress lines (`progress`). Nothing here may import torch, timm, torchvision, safetensors,
FastAPI, uvicorn, matplotlib or a torch-side collabvit module: an import-linter contract in
pyproject.toml checks it, and `pip install 'collabvit[edge]'` runs all of it.
"""
