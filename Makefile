# The two commands of the README. Each makes its own virtual environment and installs the project
# into it (non-editable, so the compiled migrate._native is what the tests import).
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip

.PHONY: demo test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(VENV)/bin/python
	$(PIP) install -q '.[test]'

demo: install
	$(VENV)/bin/migrate demo

test: install
	cd tests && ../$(VENV)/bin/python -m pytest --strict-markers -r s -c ../pyproject.toml --rootdir .. .

clean:
	rm -rf $(VENV) build *.egg-info migrate/_native*.so
