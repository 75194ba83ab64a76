# The two commands of the README: `make demo` and `make test`. Both create the virtual environment
# on first use and install tidyllm with the exact versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export LITELLM_LOCAL_MODEL_COST_MAP ?= True

PROXY_STAMP := $(VENV)/.installed-proxy
# e.g. make proxy PROXY_ARGS="--port 4000 --config tidyllm.yaml"
PROXY_ARGS ?=

.PHONY: demo test install bench docs clean proxy

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# LiteLLM's proxy server with tidyllm's governance and keys (docs/operations.md, "A LiteLLM proxy")
$(PROXY_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[proxy]'
	touch $(PROXY_STAMP)

proxy: $(PROXY_STAMP)
	$(VENV)/bin/tidyllm proxy $(PROXY_ARGS)

demo: $(STAMP)
	$(VENV)/bin/tidyllm demo

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) bench/mart_bench.py

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site build *.egg-info
