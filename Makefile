# The two set-up commands: `make demo` (main job) and `make test`. Both create .venv first.
PY := .venv/bin/python

.PHONY: demo test test-slow test-all lint venv

venv: .venv/.installed

.venv/.installed: setup.cfg pyproject.toml scripts/make_venv.sh
	bash scripts/make_venv.sh

demo: .venv/.installed
	$(PY) experiments/demo.py

test: .venv/.installed
	$(PY) -m pytest -m "not slow" -q -n 2 --dist loadgroup --durations=15

# the tests `make test` leaves out (fault injection, end-to-end suites, the 64-device compile); CI runs them
test-slow: .venv/.installed
	$(PY) -m pytest -m slow -q -n 2 --dist loadgroup --durations=10

test-all: .venv/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: .venv/.installed
	$(PY) -m ruff check moe_jax kernels experiments tests
