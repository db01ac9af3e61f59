# The two commands of the README:
#   make demo   build the demo corpus, prepare it, train the demo model, sample videos with speech
#   make test   the test suite (8 fake CPU devices)
# And: make plan-tpu  installs libtpu into .libtpu/ (outside the venv) and compiles the real
#      jova_24b train step for v5p:4x4x8 on this CPU machine (docs/scaling.md; slow, ~10+ GiB RAM)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

LIBTPU := .libtpu
# The libtpu of jax[tpu]==0.10.2 (requirements-tpu.txt).
LIBTPU_PIN := libtpu==0.0.42.1

.PHONY: venv demo test clean-demo plan-tpu

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

$(LIBTPU)/.installed:
	$(PY) -m pip install -q --target $(LIBTPU) "$(LIBTPU_PIN)"
	touch $@

# The v5p-256 row of docs/scaling.md: the plan next to XLA's memory_analysis.
plan-tpu: venv $(LIBTPU)/.installed
	PYTHONPATH=$(LIBTPU) $(PY) -m jova_jax.plan --config=configs/jova_24b.py \
	  --mesh=data=1,fsdp=32,context=4,tensor=1 --chip=v5p --topology=v5p:4x4x8 --compile=yes \
	  --config.train.grad_accum=8

clean-demo:
	rm -rf $(DEMO)
