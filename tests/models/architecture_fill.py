"""The deterministic parameter fill of ``golden/architecture_fill/README.md``, shared by the architecture tests."""

import zlib

import numpy as np
import torch


def fill_deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """Set every tensor from a seed derived from its state-dict key (the rule the golden outputs were made with)."""
    filled = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            filled[key] = torch.zeros_like(value)
            continue
        z = np.random.RandomState(zlib.crc32(key.encode())).standard_normal(value.numel())
        if key.endswith("running_var"):
            array = 1 + 0.2 * np.abs(z)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            array = 0.1 * z
        elif value.ndim > 1:
            array = z * np.sqrt(2 / (value.numel() / value.shape[0]))
        else:
            array = 0.7 + 0.1 * z
        filled[key] = torch.from_numpy(array.reshape(tuple(value.shape)).astype(np.float32))
    model.load_state_dict(filled)
    return model
