# The two commands of the README:
#   make demo   build the demo corpus, prepare it, train the demo model, sample videos with speech
#   make test   the test suite (8 fake CPU devices)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: venv demo test clean-demo

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<26"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

demo: venv
	bash data_prep/run_demo.sh $(PY) $(DEMO)

clean-demo:
	rm -rf $(DEMO)
