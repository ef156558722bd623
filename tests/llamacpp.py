"""llama.cpp's own files, for tests that check us against llama.cpp rather than against our own writer.

The sources come from the llama.cpp tree vendored in llama-cpp-python's PyPI sdist, the way
bench/compare.py gets them: `pip download` once, then the parts the tests read are unpacked into
~/.cache/pyserve-tests/llama.cpp/<version>/ (about 80 MB):
  convert_hf_to_gguf.py, conversion/, gguf-py/   llama.cpp's HF -> GGUF converter and its gguf-py
  models/ggml-vocab-*.gguf[.inp|.out]             vocabulary-only files and their tokenizer test vectors
  models/templates/*.jinja                        real chat templates (copied from models' tokenizer configs)

`python tests/llamacpp.py` fills the cache (make test does, before pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# Pinned so that the test vectors and the converter do not change under us.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE = Path(os.environ.get("PYSERVE_TEST_CACHE", Path.home() / ".cache" / "pyserve-tests"))
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-", "models/templates/")


def llama_cpp_dir() -> Path:
    """The unpacked subset of llama.cpp's sources (downloaded and unpacked if missing)."""
    root = CACHE / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    done = root / ".complete"
    # The marker names the parts unpacked, so a cache filled before a part was wanted is refilled.
    if done.exists() and done.read_text() == "\n".join(_WANTED):
        return root
    with tempfile.TemporaryDirectory(dir=CACHE.mkdir(parents=True, exist_ok=True) or CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                        "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                        "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as t:
            members = []
            for m in t.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and rel.startswith(_WANTED) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            t.extractall(root, members=members, filter="data")
    done.write_text("\n".join(_WANTED))
    return root


def vocab_files() -> list[Path]:
    """Every ggml-vocab-*.gguf that comes with test vectors (.inp and .out)."""
    models = llama_cpp_dir() / "models"
    return sorted(p for p in models.glob("ggml-vocab-*.gguf") if p.with_name(p.name + ".out").exists())


def chat_templates() -> list[Path]:
    """The real chat templates llama.cpp tests its own renderer with (models/templates/*.jinja)."""
    return sorted((llama_cpp_dir() / "models" / "templates").glob("*.jinja"))


def vocab_vectors(vocab: Path) -> list[tuple[str, list[int]]]:
    """(input text, reference ids) pairs of a vocabulary's .inp/.out files, parsed as llama.cpp's
    tests/test-tokenizer-0.cpp does: the .inp holds the inputs, each followed by the separator (the
    last one may lack it); the .out holds one line of space-separated ids per input (an empty line
    for the empty input)."""
    sep = "\n__ggml_vocab_test__\n"
    # Bytes, not read_text: universal newlines would turn an input's "\r\n" into "\n".
    raw = vocab.with_name(vocab.name + ".inp").read_bytes().decode("utf-8")
    inputs = raw.split(sep)
    if inputs[-1] == "":  # the separator ends the file rather than starting one more input
        inputs.pop()
    lines = vocab.with_name(vocab.name + ".out").read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    assert len(inputs) == len(lines), f"{vocab}: {len(inputs)} inputs but {len(lines)} outputs"
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, lines)]


def convert_hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter on an HF folder (with its own vendored gguf-py, as a user would)."""
    src = llama_cpp_dir()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out),
                        "--outtype", outtype], capture_output=True, text=True, env=env, cwd=src)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return out


if __name__ == "__main__":
    print(llama_cpp_dir())
