# buildbot-mailext developer entry points.
#
#   make demo   real master + worker + SMTP sink on loopback, one failing build, one mail
#   make test   the whole test suite (unit, end-to-end, install)
#   make fuzz   the hostile-input property test, long profile (1000 random examples)
#   make mutate mutation testing (mutmut) of the mail path against the fast unit tests;
#               slow (30+ min on 2 busy cores), not part of `make test` or CI
#
# Both create .venv when it is absent and install this checkout into it
# (editable, with the [test] extra).  The stamp file makes repeated runs skip the
# install unless setup.py changed.  tests/test_install.py checks the NON-editable
# install separately, in a venv of its own.

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.buildbot-mailext-installed
PYTEST_ARGS ?=

.PHONY: demo test fuzz venv clean-venv mutate

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

# mutmut 3 copies the checkout to mutants/ and runs the tests named in setup.cfg [mutmut]
# there; results are cached in mutants/ (delete it for a fresh run).
MUTMUT_VERSION ?= 3.8.1
MUTMUT_ARGS ?=

mutate: $(STAMP)
	$(VENV)/bin/pip install -q 'mutmut==$(MUTMUT_VERSION)'
	$(VENV)/bin/mutmut run $(MUTMUT_ARGS)
	$(VENV)/bin/python tools/mutation_summary.py

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(VENV)/bin/python -m pytest -q -ra tests/test_hostile.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
