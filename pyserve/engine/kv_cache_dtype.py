"""--kv-cache-dtype: the dtype the paged KV cache is stored in, which on the CPU may differ from
the model's. The CPU kernels (csrc/cpu/attention.cpp, cache_kernels.cpp) read and write a cache of
the model's dtype, or a bf16/fp16 cache under an fp32 model (converted as rows are loaded; fp32
math). On CUDA the cache keeps the model's dtype."""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_avx512_bf16() -> bool:
    """The CPU converts and multiplies bf16 natively (cpuid, with the OS's AVX-512 state enabled)."""
    import pyserve

    return bool(pyserve.build_info()["cpu_avx512_bf16"])


def resolve_kv_cache_dtype(name: str, device: torch.device, model_dtype: torch.dtype,
                           avx512_bf16: bool | None = None) -> torch.dtype:
    """The cache dtype for `name` (one of KV_CACHE_DTYPES). auto: on the CPU under an fp32 model,
    bfloat16 where the CPU has AVX512_BF16 (half the bytes each decode streams, for ~3 significant
    digits per K/V value), else float32; otherwise the model's dtype. Raises ValueError for a pair
    the kernels do not run. avx512_bf16: the CPU's answer (None = ask this one)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    if name == "auto":
        if device.type != "cpu" or model_dtype != torch.float32:
            return model_dtype
        has_bf16 = cpu_has_avx512_bf16() if avx512_bf16 is None else avx512_bf16
        return torch.bfloat16 if has_bf16 else torch.float32
    dtype = _NAMES[name]
    if dtype == model_dtype:
        return dtype
    model = str(model_dtype).removeprefix("torch.")
    if device.type != "cpu":
        raise ValueError(f"kv_cache_dtype {name} differs from the model's dtype {model}; on {device.type} the "
                         f"KV cache has the model's dtype (use auto or {model})")
    if model_dtype != torch.float32:
        raise ValueError(f"kv_cache_dtype {name} under a {model} model is not supported on the CPU: a cache of "
                         f"another dtype than the model's needs a float32 model (use auto or {model})")
    return dtype
