# bootimg: `make demo` runs the main job, `make test` runs every test.
# Both set the machine up first (idempotently): Debian packages, .venv, pip install -e .
.PHONY: setup test demo bench clean

PY := .venv/bin/python

setup:
	@sh tools/setup-host.sh

test: setup
	BOOTIMG_REQUIRE_ACCEL=1 $(PY) -m pytest -ra --durations=30

demo: setup
	@sh tools/demo.sh

bench: setup
	$(PY) bench/bench_composefs.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache
