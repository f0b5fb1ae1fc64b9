# Two commands set everything up on a fresh machine:
#   make demo   # venv + pinned install + tiny Swallow + a local fine-tune from experiments/local_tiny.yaml
#   make test   # venv + pinned install + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install tiny demo test clean

install: $(INSTALLED)

# transformers 5.24 needs Python >= 3.11: say so before pip stops at "No matching distribution found" for it.
# (%-formatting, not an f-string, so that even an old interpreter gets as far as printing the message.)
PYTHON_CHECK := import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else "error: $(PYTHON) is Python %d.%d \
	and transformers 5.24 needs Python >= 3.11: install one and run make PYTHON=python3.11 $(or $(MAKECMDGOALS),install)" \
	% (v[0], v[1]))

$(INSTALLED): requirements.txt requirements-local.txt
	@$(PYTHON) -c '$(PYTHON_CHECK)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-local.txt
	touch $@

tiny: $(INSTALLED)
	$(PY) -m swallow_ft.tiny

demo: tiny
	$(PY) run_clm.py --config experiments/local_tiny.yaml --fresh
	$(PY) -m swallow_ft.compare --base .cache/tiny-swallow --tuned runs/local_tiny \
		--prompts data/eval_prompts_ja.jsonl --out runs/local_tiny/comparison

test: tiny
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .cache
