"""Compile pyserve._C with its CUDA kernels into a scratch dir (not the
installed package), load it in a fresh interpreter and check that every op
has a CUDA kernel registered next to its CPU one, and that the CPU kernels of
this CUDA-enabled build still compute (one small attention batch)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Ops that have no CUDA kernel on purpose, with the reason. Every other op the extension defines must
# have both (the list of ops is read from the loaded extension, so a new op cannot be forgotten here).
_QUANT = "GGUF quantized weights run on the CPU only; on CUDA the loader dequantizes them at load (issue 16)"
CPU_ONLY: dict[str, str] = {
    "quant_pack": _QUANT,
    "quant_linear": _QUANT,
    "quant_linear_out": _QUANT,
    "quant_dequant_rows": _QUANT,
    "quantize_rows": _QUANT,
}


def main() -> int:
    build = ROOT / "build" / "ci-cuda"
    out = build / "pkg"
    shutil.rmtree(out, ignore_errors=True)
    (out / "pyserve").mkdir(parents=True)
    for py in (ROOT / "pyserve").glob("*.py"):
        shutil.copy(py, out / "pyserve" / py.name)
    env = dict(os.environ, PYSERVE_BUILD_DIR=str(build / "cmake"))
    # setup.py's build_ext honours PYSERVE_TARGET_DEVICE=cuda and fails loudly without nvcc.
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out)],
                   cwd=ROOT, env=env, check=True)
    check = f"""
import sys, torch
sys.path.insert(0, {str(out)!r})
sys.path.insert(1, {str(ROOT)!r})
import pyserve
info = pyserve.build_info()
print("ci: CUDA build:", info)
assert info["cuda"] and info["cuda_archs"], info
ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("pyserve::"))
assert len(ops) >= 11, ops
cpu_only = {sorted(CPU_ONLY)!r}
for op in ops:
    for key in ("CPU",) if op in cpu_only else ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("pyserve::" + op, key), (op, key)
print("ci: ops:", ", ".join(ops), "| CPU only:", ", ".join(cpu_only) or "none")
from tests.kernels.attention_reference import make_paged_batch, reference_attention
b = make_paged_batch([(40, 1), (0, 20), (30, 9)], 9, 3, 64, 16, torch.float32, padding_rows=1)
out = torch.ops.pyserve.paged_attention(b.query, b.key_cache, b.value_cache, b.block_tables, b.seq_lens,
                                        b.query_start_loc, b.scale, b.max_seq_len)
torch.testing.assert_close(out, reference_attention(b), atol=2e-5, rtol=1e-5)
print("ci: CUDA-enabled build loads; all ops have CPU and CUDA kernels")
"""
    return subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
