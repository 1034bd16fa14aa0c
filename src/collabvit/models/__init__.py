"""Models and what owns them: the one timm adapter (`vit`), the shipped models (`zoo`), the
edge and the server devices (`edge`, `server`), a loaded pair with its data (`pair`), and
the edge traced into ONNX (`export`).
"""
