"""pyserve: an LLM inference server on hand-written paged-attention kernels."""

# Nothing heavy at import: `pyserve --bad-flag` must fail in milliseconds, not
# after torch's import. `pyserve._ops` loads torch, the extension (which
# registers torch.ops.pyserve.*) and the fake kernels; everything that runs
# kernels imports it.

__all__ = ["LLM", "SamplingParams", "build_info"]
__version__ = "0.1.0"


def build_info() -> dict:
    """What the loaded extension was compiled with and runs: cpu_isa (the CPU kernel variant in use),
    cpu_isa_variants (those compiled in), cpu_isa_best (the widest this CPU runs), torch_version,
    cuda, cuda_version, cuda_archs."""
    from pyserve._ops import _C

    return dict(_C.build_info())


def __getattr__(name: str):
    # Lazy, so `import pyserve` (the kernels) stays cheap for tools that need only them.
    if name == "LLM":
        from pyserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pyserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pyserve' has no attribute {name!r}")
