"""Hardware peak FLOP/s for MFU: dense bf16 tensor-core peaks from the vendors' datasheets."""
from __future__ import annotations

import torch

# Substring of torch.cuda.get_device_name() -> dense bf16/fp16 peak FLOP/s (no sparsity).
_GPU_PEAKS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of `device`, or None when unknown (CPU, or a GPU not in the table: MFU is then not logged)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _GPU_PEAKS if key in name), None)
