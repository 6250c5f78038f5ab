# The two commands of the README: `make demo` and `make test`. Each sets itself up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch (a plain "torch" requirement would pull a multi-GB CUDA build).
# On a GPU machine, set TORCH_SPEC to the build you want, or use a venv that has it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-notebooks lab lint test-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) -m nb_offload demo

test: setup
	$(PY) -m pytest -q tests

# The teaching notebooks, run top to bottom; nbval compares the outputs of the cells marked to be checked.
test-notebooks: setup
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks

# JupyterLab with nb_offload, opened at the quick-start notebook. Its settings (jupyter/overrides.json,
# for this venv's JupyterLab and Notebook 7, which read the same folder) save widget state with the
# notebook, so a notebook reopened without its kernel shows its dashboards as they were instead of
# "model not found". For Notebook 7, run .venv/bin/jupyter notebook once make lab has set this up.
lab: setup
	$(PY) -c "import jupyterlab, notebook" 2>/dev/null || $(PY) -m pip install -q -e ".[notebook]"
	mkdir -p $(VENV)/share/jupyter/lab/settings
	test -f $(VENV)/share/jupyter/lab/settings/overrides.json || cp jupyter/overrides.json $(VENV)/share/jupyter/lab/settings/
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/01-quick-start.ipynb

lint: setup
	$(VENV)/bin/ruff check .

test-gpu:
	PYTHONPATH=. python3 -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) .demo .pytest_cache
