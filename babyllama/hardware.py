"""What this machine's CPU offers the precision and compile choices (`--mixed-precision auto`, `--torch-compile
auto`, decoding's `--dtype auto`): native bf16 instructions, and a C++ compiler for inductor."""
from __future__ import annotations

import os
import shutil

import torch


def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX-512 BF16 or AMX instructions, as PyTorch detects them (cpuinfo): there oneDNN's bf16 matrix
    products run at ~2.7x fp32; elsewhere bf16 is converted in software and is slower than fp32."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
                getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU (its CXX, else g++/c++/clang++ on PATH)."""
    names = (os.environ.get("CXX"), "g++", "c++", "clang++")
    return next((found for name in names if name and (found := shutil.which(name))), None)
