# The two commands a new machine needs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= study-out

.PHONY: demo test sanitize clean

# One virtual environment per extra set; reinstalled when the build inputs change.
$(VENV)/.ok-%: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.ok-plot
	$(VENV)/bin/qconv backends
	$(VENV)/bin/qconv study --quick --out $(OUT)

test: $(VENV)/.ok-test
	$(PY) -m pytest -q
	$(MAKE) sanitize

sanitize: $(VENV)/.ok-test
	PYTHON=$(abspath $(PY)) csrc/sanitize.sh

clean:
	rm -rf $(VENV) build src/*.egg-info src/qconv/_qconv_c*.so src/qconv/_qconv_c.c $(OUT)
