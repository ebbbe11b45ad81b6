# `make demo` and `make test` set themselves up: a virtualenv in .venv with pixelmill installed (editable).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BROWSER_STAMP := $(VENV)/.browser-stamp
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install lint format test demo bench bench-curate bench-curate-scale bench-train bench-eval bench-ldm bench-drawbench bench-dedup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'  # byte-compiles: CI sets PYTHONDONTWRITEBYTECODE, so nothing compiled later is kept
	touch $(STAMP)

# Headless Chromium for the test that screenshots the DrawBench HTML report: Debian's package, installed when
# this runs as root with apt-get; elsewhere that one test is skipped (with PIXELMILL_REQUIRE_CHROMIUM=1, it fails).
$(BROWSER_STAMP):
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no chromium (apt-get install chromium): the HTML report screenshot test will be skipped"
	@touch $@

install: $(STAMP)

# ruff (configured in pyproject.toml, line length 120): `make lint` checks, `make format` rewrites.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m pipeline.demo $(ARGS)

bench: $(STAMP)
	$(PY) bench/crawl.py $(ARGS)

bench-curate: $(STAMP)
	$(PY) bench/curate.py $(ARGS)

bench-curate-scale: $(STAMP)
	$(PY) bench/curate_scale.py $(ARGS)

bench-train: $(STAMP)
	$(PY) bench/train_clip.py $(ARGS)

bench-eval: $(STAMP)
	$(PY) bench/eval.py $(ARGS)

bench-ldm: $(STAMP)
	$(PY) bench/train_ldm.py $(ARGS)

bench-drawbench: $(STAMP)
	$(PY) bench/drawbench.py $(ARGS)

# Fetches its pictures (Debian packages, scikit-image's wheel) into ~/.cache/pixelmill/dedup-bench once.
bench-dedup: $(STAMP)
	$(PY) bench/dedup.py $(ARGS)

clean:
	rm -rf data outputs multirun bench/out
