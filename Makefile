# `make demo` and `make test` set themselves up: a virtualenv in .venv with pixelmill installed (editable).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test demo bench bench-curate bench-train bench-eval bench-ldm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m pipeline.demo $(ARGS)

bench: $(STAMP)
	$(PY) bench/crawl.py $(ARGS)

bench-curate: $(STAMP)
	$(PY) bench/curate.py $(ARGS)

bench-train: $(STAMP)
	$(PY) bench/train_clip.py $(ARGS)

bench-eval: $(STAMP)
	$(PY) bench/eval.py $(ARGS)

bench-ldm: $(STAMP)
	$(PY) bench/train_ldm.py $(ARGS)

clean:
	rm -rf data outputs multirun bench/out
