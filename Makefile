# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test bench clean

venv: $(STAMP)

# torch first, pinned to the local CPU wheel: asking pip for plain `torch`
# would fetch a multi-GB CUDA build. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/eval_speed.py
	$(PY) bench/train_speed.py
	$(PY) bench/extract_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
