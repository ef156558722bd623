"""Build pyserve._C once per CPU ISA (by default scalar, and avx2 and
avx512_vnni where this CPU runs them; argv overrides) into scratch dirs
(build/isa-*), run the quantized matmul of every format in each build on the
same inputs, and check that all builds give the same bits (csrc/cpu/quant/:
the paths order their fp32 math alike). About 4 minutes on 2 cores."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])
import pyserve
from pyserve import _ops
from tests.kernels.quant_reference import QTYPES, QUANTIZABLE, weight_blocks
assert pyserve.__file__.startswith(sys.argv[1]), pyserve.__file__
out = {"isa": pyserve.build_info()["cpu_isa"]}
g = torch.Generator().manual_seed(0)
for t in sorted(QTYPES):
    for n, k in ((13, 512), (200, 1536), (64, 256)):
        blocks = weight_blocks(n, k, t, t)
        packed = _ops.quant_pack(blocks, t, k)
        out[f"pack/{t}/{n}x{k}"] = packed
        x = torch.randn(37, k, generator=g) * 3
        out[f"linear/{t}/{n}x{k}"] = _ops.quant_linear(x, packed, t, n, k, torch.randn(n, generator=g))
        out[f"linear1/{t}/{n}x{k}"] = _ops.quant_linear(x[5:6], packed, t, n, k)
        out[f"dequant/{t}/{n}x{k}"] = _ops.quant_dequant_rows(packed, torch.arange(n), t, n, k)
        if t in QUANTIZABLE:
            out[f"quantize/{t}/{n}x{k}"] = _ops.quantize_rows(x, t)
torch.save(out, sys.argv[3])
"""


def build(isa: str) -> Path:
    base = ROOT / "build" / f"isa-{isa}"
    pkg = base / "pkg"
    (pkg / "pyserve").mkdir(parents=True, exist_ok=True)
    for py in (ROOT / "pyserve").glob("*.py"):
        shutil.copy(py, pkg / "pyserve" / py.name)
    env = dict(os.environ, PYSERVE_BUILD_DIR=str(base / "cmake"), PYSERVE_CPU_ISA=isa, PYSERVE_TARGET_DEVICE="cpu")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(pkg)],
                   cwd=ROOT, env=env, check=True)
    return pkg


def runnable_isas() -> list[str]:
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isas = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            isas.append("avx512_vnni")
    return isas


def main() -> int:
    isas = sys.argv[1:] or runnable_isas()
    import torch

    results = {}
    for isa in isas:
        pkg = build(isa)
        dump = pkg.parent / "quant_outputs.pt"
        subprocess.run([sys.executable, "-c", CHILD, str(pkg), str(ROOT), str(dump)], cwd=ROOT, check=True)
        results[isa] = torch.load(dump)
        assert results[isa]["isa"] == isa, results[isa]["isa"]
    first = isas[0]
    bad = 0
    for isa in isas[1:]:
        for key, want in results[first].items():
            if key == "isa":
                continue
            if not torch.equal(results[isa][key], want):
                bad += 1
                diff = (results[isa][key].double() - want.double()).abs().max().item()
                print(f"quant ISA check: {key} differs between {first} and {isa} (max |diff| {diff:g})")
    print(f"quant ISA check: {', '.join(isas)}: {'all outputs bit-identical' if not bad else f'{bad} differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
