"""What this machine's CPU offers the precision and compile choices (`--mixed-precision auto`, `--torch-compile
auto`, decoding's `--dtype auto`): native bf16 instructions, and a C++ compiler for inductor."""
from __future__ import annotations

import os
import shutil

import torch


def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX-512 BF16 or AMX instructions, as PyTorch detects them (cpuinfo): there oneDNN's bf16 matrix
    products run at ~2.7x fp32; elsewhere bf16 is converted in software and is slower than fp32."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) or cpu_has_amx()


def cpu_has_amx() -> bool:
    """Intel CPUs with AMX tiles (Sapphire Rapids and later), as PyTorch detects them."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU (its CXX, else g++/c++/clang++ on PATH)."""
    names = (os.environ.get("CXX"), "g++", "c++", "clang++")
    return next((found for name in names if name and (found := shutil.which(name))), None)


def separate_inductor_cache() -> None:
    """Give a process run with ATEN_CPU_CAPABILITY its own inductor cache. torch 2.13's cache of compiled graphs does
    not key on it: a graph compiled under ATEN_CPU_CAPABILITY=avx2 (loops over 8 floats) was reused by a later run
    with the default AVX-512 kernels, whose vectors hold 16, and wrote past its buffers (heap corruption, abort at
    the first step). An explicit TORCHINDUCTOR_CACHE_DIR is left alone."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{capability.lower()}"
