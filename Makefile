# Two commands (README):
#   make example   set up a venv, build caio, run the README example
#   make test      set up a venv, build caio, run the whole test suite
# PYTHON=/path/to/python3.X VENV=.venv3X selects another interpreter.
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: develop example test clean

develop:
	./scripts/dev-setup.sh "$(PYTHON)" "$(VENV)"

example: develop
	cd "$$(mktemp -d)" && "$(CURDIR)/$(VENV)/bin/python" "$(CURDIR)/examples/example.py"

test: develop
	"$(VENV)/bin/python" -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build target caio/*.so *.egg-info
