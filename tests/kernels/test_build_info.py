"""The extension says what it was built with."""

import json
import os
import subprocess
import sys

import torch

import pyserve


def test_build_info_describes_the_build():
    info = pyserve.build_info()
    assert "scalar" in info["cpu_isa_variants"]
    assert info["cpu_isa"] in info["cpu_isa_variants"] and info["cpu_isa_best"] in info["cpu_isa_variants"]
    assert info["torch_version"] == torch.__version__.split("+")[0] or info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert bool(info["cuda_archs"]) == info["cuda"]


def test_active_variant_is_pyserve_cpu_isa_or_the_widest():
    # Also run by tests/kernels/test_cpu_isa.py under each PYSERVE_CPU_ISA this CPU supports.
    info = pyserve.build_info()
    assert info["cpu_isa"] == (os.environ.get("PYSERVE_CPU_ISA") or info["cpu_isa_best"])


def test_env_module_prints_json():
    out = subprocess.run([sys.executable, "-m", "pyserve.env"], capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["extension"] == pyserve.build_info()
    assert info["torch"] == torch.__version__


def test_every_op_has_a_cpu_kernel():
    for op in ("reshape_and_cache", "compute_slot_mapping", "paged_attention", "copy_blocks", "sample"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyserve::{op}", "CPU"), op
