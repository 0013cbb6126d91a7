"""Running the fused ops inside TorchTitan's AMP (single-device/DDP runs).

Under ``torch.autocast`` an ``nn.Linear`` casts its weight to the autocast
dtype and the residual stream stays in the parameter dtype. The fused ops get
the same: their GEMM weights cast to the autocast dtype, activations as they
are, and autocast itself off inside so it does not re-cast their internals.
"""

import contextlib

import torch


def compute_weights(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The GEMM weights as autocast would hand them to a linear layer."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return weights
    dtype = torch.get_autocast_dtype(device)
    return tuple(w.to(dtype) for w in weights)


def outside_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(x.device.type, enabled=False)
