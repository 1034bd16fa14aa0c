"""numpy views of arrays and torch tensors, without importing torch.

The torch-free modules (summary, protocol, the ONNX edge) take either kind, so the torch
edge and server hand them tensors and the light edge numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # a numpy array or a torch tensor (any device)


def as_array(values: Array) -> np.ndarray:
    """A numpy view of an array or of a torch tensor (moved to the CPU; half floats widened
    to float32, so the values are the same numbers)."""
    if hasattr(values, "detach"):  # a torch tensor; torch itself is not imported here
        values = values.detach().cpu()
        if values.dtype.is_floating_point and values.element_size() < 4:
            values = values.float()
        return values.numpy()
    return np.asarray(values)
