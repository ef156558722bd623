"""The CPU kernels' ISA variants (cmake/cpu_isa.cmake, csrc/cpu/cpu_features.h): each variant this
CPU runs agrees with the PyTorch references, the quantized ops give the same bits under every
variant, PYSERVE_CPU_ISA picks one or fails the import with the reason, and no code outside the
variants holds a vector instruction."""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyserve
from pyserve import _ops
from pyserve._ops import _C
from tests.kernels.quant_reference import QTYPES, QUANTIZABLE, weight_blocks

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ["scalar", "avx2", "avx512", "avx512_vnni"]  # each runs everything the ones before it can
QUANT_NAMES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
INFO = pyserve.build_info()
RUNNABLE = [v for v in INFO["cpu_isa_variants"] if VARIANTS.index(v) <= VARIANTS.index(INFO["cpu_isa_best"])]
LACKING = [v for v in INFO["cpu_isa_variants"] if v not in RUNNABLE]

# The suite runs every kernel test under the active variant (the widest, unless PYSERVE_CPU_ISA says
# otherwise). Under each other variant this CPU runs, a subprocess reruns these cases: every op of
# the per-variant sources in every dtype, row lengths on and off the vector width, head dims 80 to
# 256, windows and soft-caps, attention of an fp32 query over bf16 / fp16 caches, the sampling
# filters and top logprobs, the quantized matmul of each format (its non-finite rows, its batch
# invariance). About 11-16 s per variant (3 s of it the
# interpreter and torch); an id that no longer exists fails the run.
SUBSET = {
    "test_build_info.py": ["test_active_variant_is_pyserve_cpu_isa_or_the_widest"],
    "test_layer_ops.py": [
        "test_rms_norm[37-576-dtype0-cpu]", "test_rms_norm[37-576-dtype1-cpu]", "test_rms_norm[37-576-dtype2-cpu]",
        "test_rms_norm[3-4096-dtype0-cpu]", "test_rms_norm_of_strided_rows[cpu]",
        "test_fused_add_rms_norm[33-576-dtype0-cpu]", "test_fused_add_rms_norm[33-576-dtype2-cpu]",
        "test_rms_norm_gemma_weight[37-576-dtype1-cpu]", "test_fused_add_rms_norm_gemma_weight[130-96-dtype2-cpu]",
        "test_rms_norm_inplace_2d[37-576-dtype2-cpu]", "test_rms_norm_inplace_head_major_view[cpu]",
        "test_per_head_qk_norm_in_a_fused_qkv_projection[gemma3-8-4-256-dtype1-cpu]",
        "test_silu_and_mul[64-1536-dtype0-cpu]", "test_silu_and_mul[64-1536-dtype2-cpu]",
        "test_silu_and_mul[7-13-dtype1-cpu]", "test_silu_and_mul_saturates_cleanly[cpu]",
        "test_gelu_tanh_and_mul[64-1536-dtype0-cpu]", "test_gelu_tanh_and_mul[2-9216-dtype2-cpu]",
        "test_gelu_tanh_and_mul[7-13-dtype1-cpu]", "test_gelu_tanh_and_mul_saturates_cleanly[cpu]",
        "test_rotary_on_a_fused_qkv_projection[9-3-64-dtype0-cpu]",
        "test_rotary_on_a_fused_qkv_projection[2-1-80-dtype2-cpu]",
    ],
    "test_attention.py": [
        "test_mixed_batch[9-3-16-128-dtype0-cpu]", "test_mixed_batch[8-1-32-80-dtype1-cpu]",
        "test_window_and_soft_cap_dtypes[None-20.0-64-dtype2-cpu]",
        "test_window_and_soft_cap_dtypes[70-3.0-256-dtype0-cpu]", "test_soft_cap_mixed_batch[8-2-16-128-30.0-cpu]",
        "test_sliding_window_mixed_batch[9-3-16-64-70-cpu]", "test_decode_only_default_model_shape[cpu]",
        "test_strided_query[cpu]",
        # --kv-cache-dtype: an fp32 query over bf16 / fp16 caches (the widening loads of cpu/vec.h).
        "test_fp32_query_low_precision_cache[9-3-16-128-cache_dtype0]",
        "test_fp32_query_low_precision_cache[8-1-32-80-cache_dtype1]",
        "test_fp32_query_low_precision_cache[4-4-8-256-cache_dtype0]",
        "test_fp32_query_low_precision_cache_window_and_soft_cap[70-3.0-cache_dtype0]",
        "test_fp32_query_low_precision_cache_window_and_soft_cap[None-20.0-cache_dtype1]",
        "test_fp32_query_bf16_cache_decode_default_model_shape",
    ],
    "test_sampling.py": [
        "test_greedy_is_argmax[32003-dtype2-cpu]", "test_greedy_is_argmax[7-dtype0-cpu]",
        "test_matches_reference_mixed_rows[1003-dtype0-cpu]", "test_matches_reference_mixed_rows[1003-dtype1-cpu]",
        "test_matches_reference_mixed_rows[1003-dtype2-cpu]", "test_matches_reference_large_vocab[0-0.9-cpu]",
        "test_all_logprobs[cpu]", "test_matches_reference_ties[cpu]",
    ],
    "test_quant_ops.py": [
        *(f"test_quant_linear_matches_dequantized_matmul[True-5-64-1536-{t}]" for t in QUANT_NAMES),
        *(f"test_non_finite_activations_reach_the_output[{t}]" for t in QUANT_NAMES),
        *(f"test_results_do_not_depend_on_the_batch[{t}]" for t in QUANT_NAMES),
        "test_quantize_rows_is_bit_identical_to_gguf[Q4_0]", "test_dequant_rows_is_bit_identical_to_gguf[13-576-Q6_K]",
    ],
}
NODE_IDS = [f"tests/kernels/{file}::{case}" for file, cases in SUBSET.items() for case in cases]


def run_python(isa: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSERVE_CPU_ISA=isa)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("isa", [v for v in RUNNABLE if v != INFO["cpu_isa"]])
def test_kernels_agree_with_the_references_under(isa):
    r = run_python(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NODE_IDS)
    assert r.returncode == 0, f"PYSERVE_CPU_ISA={isa}:\n{r.stdout[-8000:]}\n{r.stderr[-2000:]}"
    assert f"{len(NODE_IDS)} passed" in r.stdout, r.stdout[-2000:]


def quant_outputs() -> dict:
    """Every quantized op of every format on fixed inputs, under this process's variant. Shapes: a
    partial last tile (13 rows), an odd number of tiles (200: AVX-512 VNNI's lone last tile), the
    K-quants' 256-blocks; 37 activation rows (whole and partial groups of 4) and a single row."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for t in sorted(QTYPES):
        for n, k in ((13, 512), (200, 1536), (64, 256)):
            packed = _ops.quant_pack(weight_blocks(n, k, t, t), t, k)
            x = torch.randn(37, k, generator=g) * 3
            out[f"pack/{t}/{n}x{k}"] = packed
            out[f"linear/{t}/{n}x{k}"] = _ops.quant_linear(x, packed, t, n, k, torch.randn(n, generator=g))
            out[f"linear1/{t}/{n}x{k}"] = _ops.quant_linear(x[5:6], packed, t, n, k)
            out[f"dequant/{t}/{n}x{k}"] = _ops.quant_dequant_rows(packed, torch.arange(n), t, n, k)
            if t in QUANTIZABLE:
                out[f"quantize/{t}/{n}x{k}"] = _ops.quantize_rows(x, t)
    return out


# The quantized kernels' paths (csrc/cpu/quant/simd.h: vpdpbusd, maddubs, scalar) order their fp32
# math alike, so every variant must give the same bits as the active one, packed layout included.
# (The outputs of .ci/check_quant_isa.py, which built once per ISA; about 5 s per variant.)
@pytest.mark.parametrize("isa", [v for v in RUNNABLE if v != INFO["cpu_isa"]])
def test_quant_ops_give_the_same_bits_under(isa, tmp_path):
    dump = tmp_path / "quant_outputs.pt"
    r = run_python(isa, "-c", "import sys, torch; from tests.kernels.test_cpu_isa import INFO, quant_outputs; "
                              "torch.save({'isa': INFO['cpu_isa'], **quant_outputs()}, sys.argv[1])", str(dump))
    assert r.returncode == 0, f"PYSERVE_CPU_ISA={isa}:\n{r.stderr[-4000:]}"
    theirs = torch.load(dump)
    assert theirs.pop("isa") == isa
    ours = quant_outputs()
    assert theirs.keys() == ours.keys()
    differ = [f"{key}: max |diff| {(theirs[key].double() - want.double()).abs().max().item():g}"
              for key, want in ours.items() if not torch.equal(theirs[key], want)]
    assert not differ, f"{isa} vs {INFO['cpu_isa']}:\n" + "\n".join(differ)


def test_every_variant_of_this_build_is_known():
    assert INFO["cpu_isa_variants"][0] == "scalar"
    assert INFO["cpu_isa_variants"] == VARIANTS[:len(INFO["cpu_isa_variants"])]
    if platform.machine() in ("x86_64", "AMD64"):
        assert INFO["cpu_isa_variants"] == VARIANTS


@pytest.mark.parametrize("isa", ["sse9"] + LACKING)
def test_a_variant_this_cpu_or_build_cannot_run_fails_the_import(isa):
    r = run_python(isa, "-c", "import pyserve._ops")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: PYSERVE_CPU_ISA=" + isa), r.stderr[-3000:]
    assert "Unset PYSERVE_CPU_ISA" in last or "unset it" in last, last


@pytest.mark.parametrize("requested,best,want", [
    ("", "avx2", "avx2"), ("", "scalar", "scalar"), ("", "avx512_vnni", "avx512_vnni"),
    ("scalar", "avx512_vnni", "scalar"), ("avx2", "avx512", "avx2"), ("avx512", "avx512", "avx512"),
])
def test_pyserve_cpu_isa_picks_a_variant(requested, best, want):
    assert _C._resolve_cpu_isa(requested, best) == want


@pytest.mark.parametrize("requested", ["sse9", "AVX2", "avx2 ", "avx512vnni"])
def test_only_a_variant_name_is_accepted(requested):
    with pytest.raises(RuntimeError, match=re.escape(f"PYSERVE_CPU_ISA={requested} is not a CPU kernel variant; "
                                                     f"this build has: {', '.join(INFO['cpu_isa_variants'])}")):
        _C._resolve_cpu_isa(requested, "avx512_vnni")


@pytest.mark.parametrize("requested,best,message", [
    ("avx512", "avx2", "this CPU cannot run the avx512 kernels, which need AVX-512 F, BW, VL and DQ (enabled by the "
                       "OS); the widest it runs is avx2. Unset PYSERVE_CPU_ISA or set it to one of: scalar, avx2."),
    ("avx512_vnni", "avx2", "which need AVX-512 F, BW, VL and DQ (enabled by the OS) plus AVX-512 VNNI; the widest it "
                            "runs is avx2"),
    ("avx2", "scalar", "which need AVX2, FMA and F16C; the widest it runs is scalar. Unset PYSERVE_CPU_ISA or set it "
                       "to one of: scalar."),
    ("avx512_vnni", "avx512", "which need AVX-512 VNNI; the widest it runs is avx512"),
])
def test_a_variant_the_cpu_lacks_is_refused_with_the_reason(requested, best, message):
    if INFO["cpu_isa_variants"] != VARIANTS:
        pytest.skip("this build has only the scalar variant")
    with pytest.raises(RuntimeError, match="PYSERVE_CPU_ISA=" + requested + ": ") as e:
        _C._resolve_cpu_isa(requested, best)
    assert message in str(e.value)


# ---- only the variants' code holds vector instructions -------------------------------------------
# Everything outside the per-variant sources runs on any x86-64, before the CPU check included. The
# risk is not our own code (compiled without -m flags) but inline functions from headers (std::,
# c10::) that each variant compiles with its own flags: the linker keeps one copy of each, and it
# must be the narrowest (cmake/cpu_isa.cmake links the baseline objects first, then the variants in
# order). So: every global function outside pyserve::cpu::<variant>::, and every local function it
# calls (a variant's private clone of std::sort, say), must be free of vector instructions. A name
# that mentions pyserve::cpu::<variant>:: (its own code, lambdas, templates instantiated on them)
# exists only in that variant, and must hold nothing wider than the variant.

FUNCTION = re.compile(r"^([0-9a-f]+) <(.+)>:$")
BRANCH = re.compile(r"^(?:call|j[a-z]+)\s+([0-9a-f]+) <([^>]+)>")
VARIANT_NAMESPACE = re.compile(r"pyserve::cpu::(scalar|avx2|avx512|avx512_vnni)::")
# AVX-512's opmask instructions; VEX/EVEX instructions all start with "v".
MASK_OP = re.compile(r"^k(add|and|andn|mov|not|or|ortest|shiftl|shiftr|test|unpck|xnor|xor)[bwdq]")
# EVEX-only: zmm registers, xmm/ymm 16-31, opmasks, and AVX-512 instructions that take no such operand.
EVEX_OPERAND = re.compile(r"%zmm|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|%k[0-7]")
EVEX_MNEMONIC = re.compile(r"^v(pternlog|movdq[au](8|16|32|64)|perm[it]2|pcompress|pexpand|compress|expand"
                           r"|(broadcast|extract|insert)[fi](32|64)x|rcp14|rsqrt14|scalef|getexp|getmant|rndscale"
                           r"|fixupimm|reduce|range|fpclass|pmov[su]?(qd|qw|qb|dw|db|wb)|pmov(m2|[bwdq]2m)"
                           r"|ptestn?m|pcmpu?[bwdq]\b|pconflict|plzcnt|pmullq|pro[lr]v?[dq]|psraq|pabsq"
                           r"|p(max|min)[su]q|cvtt?p[sd]2u?qq|cvtu?qq2p[sd]|cvtt?p[sd]2udq|cvtudq2p[sd]|align[dq]"
                           r"|dbpsadbw|permw|ps[lr]lvw|psravw)")
VNNI_MNEMONIC = re.compile(r"^vpdp(bu|ws)sds?$")
LEVELS = ["baseline", "AVX2", "AVX-512", "VNNI"]


def isa_level(instruction: str) -> int:
    """0: baseline x86-64, 1: AVX/AVX2 (VEX), 2: AVX-512 (EVEX), 3: VNNI."""
    words = instruction.split()
    while words and words[0] in ("rep", "repz", "repnz", "lock", "notrack", "bnd", "data16", "addr32", "cs", "ds"):
        words = words[1:]
    if not words:
        return 0
    op = words[0]
    if VNNI_MNEMONIC.match(op):
        return 3
    if MASK_OP.match(op) or (op.startswith("v") and (EVEX_OPERAND.search(instruction) or EVEX_MNEMONIC.match(op))):
        return 2
    return 1 if op.startswith("v") and op not in ("verr", "verw") else 0


def disassemble(library: str):
    """({address: name}, {address: widest ISA level}, {address: called addresses}, global addresses)."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True,
                         check=True).stdout
    names: dict[int, str] = {}
    levels: dict[int, int] = {}
    calls: dict[int, set] = {}
    plt_calls: dict[int, set] = {}
    current = None
    for line in out.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = int(m.group(1), 16)
            names[current], levels[current], calls[current], plt_calls[current] = m.group(2), 0, set(), set()
        elif current is not None and "\t" in line:
            instruction = line.split("\t", 1)[1].strip()
            levels[current] = max(levels[current], isa_level(instruction))
            b = BRANCH.match(instruction)
            if b and b.group(2).endswith("@plt"):
                plt_calls[current].add(b.group(2)[:-4])
            elif b:
                calls[current].add(int(b.group(1), 16))
    # Binding: a local symbol ('t') is reachable only from its own object file; others ('T', 'W', 'u',
    # 'i') are what the linker merges and other objects call.
    bound_global = set()
    for line in subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] in "TWui":
            bound_global.add(int(parts[0], 16))
    # A call through the PLT reaches this library's own definition of the name, if it has one.
    by_name = {names[a]: a for a in names if a in bound_global}
    for a, targets in plt_calls.items():
        calls[a] |= {by_name[t] for t in targets if t in by_name}
    return names, levels, calls, bound_global


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="needs an x86-64 build and binutils")
def test_only_the_variants_hold_vector_instructions():
    names, levels, calls, bound_global = disassemble(_C.__file__)
    allowed = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_vnni": 3}

    def reach(root: int) -> tuple[int, str]:
        """The widest level among root and the local functions it reaches, and where it is."""
        best, where, seen, todo = 0, names[root], {root}, [root]
        while todo:
            a = todo.pop()
            if levels[a] > best:
                best, where = levels[a], names[a]
            for c in calls[a]:
                if c in names and c not in seen and c not in bound_global:
                    seen.add(c)
                    todo.append(c)
        return best, where

    wrong = []
    for a, name in names.items():
        m = VARIANT_NAMESPACE.search(name)
        if m and levels[a] > allowed[m.group(1)]:
            wrong.append(f"{LEVELS[levels[a]]} in {m.group(1)} code: {name}")
        elif not m and a in bound_global:
            level, where = reach(a)
            if level:
                wrong.append(f"{LEVELS[level]} in baseline code: {name}" + ("" if where == name else f" via {where}"))
    assert not wrong, "\n".join(sorted(wrong)[:40])
    # The check sees vector code where there is some: every SIMD variant's kernels have it.
    for variant in ("avx2", "avx512", "avx512_vnni"):
        assert any(f"pyserve::cpu::{variant}::" in names[a] and levels[a] for a in names), variant
    # The quantized kernels: vpdpbusd in the avx512_vnni variant (csrc/cpu/quant/simd.h), the AVX2
    # path in avx2 and avx512 (nothing above their level, checked above).
    assert any("pyserve::cpu::avx512_vnni::quant::" in names[a] and levels[a] == 3 for a in names)
    for variant in ("avx2", "avx512"):
        assert any(f"pyserve::cpu::{variant}::quant::" in names[a] and levels[a] >= 1 for a in names), variant
