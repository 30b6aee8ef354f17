# buildbot-mailext developer entry points.
#
#   make demo   real master + worker + SMTP sink on loopback, one failing build, one mail
#   make test   the whole test suite (unit, end-to-end, install)
#   make fuzz   the hostile-input property test, long profile (1000 random examples)
#
# Both create .venv when it is absent and install this checkout into it
# (editable, with the [test] extra).  The stamp file makes repeated runs skip the
# install unless setup.py changed.  tests/test_install.py checks the NON-editable
# install separately, in a venv of its own.

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.buildbot-mailext-installed
PYTEST_ARGS ?=

.PHONY: demo test fuzz venv clean-venv

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m buildbot_mailext.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra tests $(PYTEST_ARGS)

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(VENV)/bin/python -m pytest -q -ra tests/test_hostile.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
