# One entry point for people and CI. `make demo` and `make test` set themselves up.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test demo test test-fast check lint typecheck pytest bench bench-http bench-forward bench-delivery bench-fleet bench-collect clean container-e2e k8s-e2e pi-e2e install-pi

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

demo: setup  ## start a working agent with the bundled demo model
	$(VENV)/bin/edge-agent demo

test: setup-test check pytest  ## the whole test suite, lint and types included

test-fast: setup-test check  ## the edit loop: lint, types and the tests not marked slow
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

check: setup lint typecheck

lint:
	$(VENV)/bin/ruff check agent converter fleet tests bench scripts
	$(VENV)/bin/ruff format --check agent converter fleet tests bench scripts

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: bench-http bench-forward bench-delivery bench-fleet bench-collect  ## every benchmark; each prints its figures

bench-http: setup
	$(PY) bench/http.py

bench-forward: setup
	$(PY) bench/forward.py

bench-delivery: setup
	$(PY) bench/delivery.py

bench-fleet: setup-test  # imports the test fixtures (brokers, NATS, nginx)
	$(PY) bench/fleet.py

bench-collect: setup-test
	$(PY) bench/collect.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

container-e2e:  ## build Dockerfile.arm64 for arm64 (buildah + qemu) and run it with podman; needs root
	scripts/container-e2e.sh

k8s-e2e: setup  ## the central images built, the manifests validated, scanned and run by podman kube play with a real agent; needs root
	scripts/k8s-e2e.sh

pi-e2e: setup  ## the agent under a real arm64 systemd (debootstrap + qemu + nspawn); needs root
	scripts/pi-e2e.sh

install-pi:  ## on a Raspberry Pi (64-bit OS): venv in /opt/edge-agent, config, systemd unit; needs root
	scripts/install-pi.sh
