# Quick start:  make demo   (draw with the built-in demo model)      make test   (the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PROMPT ?= a small red circle on the left on a blue background
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo tiny test lint clean optimum-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[export,serve,test]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/diffrt generate demo "$(PROMPT)" -o out.png

# A tiny random-weight checkpoint exported to build/tiny-sd1.bundle (what the benchmarks and docs use).
tiny: $(STAMP)
	$(PY) -m tests.builders.sd build/tiny-sd1 sd1 > /dev/null
	$(VENV)/bin/diffrt export build/tiny-sd1 -o build/tiny-sd1.bundle --force

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# optimum-onnx pins transformers < 4.58, which current diffusers does not accept: a venv of its own.
optimum-venv: .venv-optimum/.installed
.venv-optimum/.installed:
	python3 -m venv .venv-optimum
	.venv-optimum/bin/pip install -q -c constraints.txt torch 'optimum-onnx[onnxruntime]==0.1.0' diffusers
	touch $@

clean:
	rm -rf build out.png
