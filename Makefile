# The two commands of the README:
#   make demo   build the demo corpus, prepare it, train the demo model, sample videos with speech
#   make test   the test suite (8 fake CPU devices)
# And: make plan-tpu  installs libtpu into .libtpu/ (outside the venv) and compiles the real
#      jova_24b train step for v5p:4x4x8 on this CPU machine (docs/scaling.md; slow, ~10+ GiB RAM)
#      make bench-peer  builds .venv-dev (with torch + diffusers, requirements-dev.txt) and times the
#      demo train step against diffusers' WanTransformer3DModel sized to match (docs/performance.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

DEV_VENV := .venv-dev
DEV_PY := $(DEV_VENV)/bin/python

LIBTPU := .libtpu
# The libtpu of jax[tpu]==0.10.2 (requirements-tpu.txt).
LIBTPU_PIN := libtpu==0.0.42.1

.PHONY: venv demo test clean-demo plan-tpu bench-peer

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

# A second venv: torch's setuptools>=77 would lift requirements.txt's setuptools<70 in .venv.
$(DEV_VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-dev.txt
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_PY) -m pip install -q --upgrade "pip<26"
	$(DEV_PY) -m pip install -q -r requirements.txt
	$(DEV_PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(DEV_PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Issue 16's side-by-side: our demo train step and the size-matched diffusers Wan step, rounds
# alternating in one process (jova_jax/tools/wan_peer.py; ~10 min on 2 cores with torch.compile).
bench-peer: $(DEV_VENV)/.installed
	$(DEV_PY) -m jova_jax.tools.wan_peer --config=configs/demo.py --rounds=20

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
