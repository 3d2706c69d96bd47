# Two commands are all a user needs: `make run` and `make test`.
# Both create or update .venv from pyproject.toml on their own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.yaml
STAMP  := $(VENV)/.installed
PORTS   = $(if $(SMTP_PORT), --smtp-port $(SMTP_PORT))$(if $(HTTP_PORT), --http-port $(HTTP_PORT))

.PHONY: run test fuzz lint bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Starts the relay on 127.0.0.1:2525 in sandbox mode: local stand-ins for Entra ID and
# Exchange Online, every delivered message kept as a file. No Microsoft account needed.
# Ports taken by something else: make run SMTP_PORT=2526 HTTP_PORT=8026 (0: any free one).
run: $(STAMP)
	$(BIN)/smtp-oauth-relay run --sandbox --config $(CONFIG)$(PORTS)

test: $(STAMP)
	$(BIN)/ruff check relay tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The property-based tests (tests/test_prop_*.py) with many more examples than `make test`
# gives them, random rather than fixed; failures found are replayed from .hypothesis/.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -m fuzz $(PYTEST_ARGS)

# One table: sending direct vs the libraries' floor vs the relay, from one run (BENCHMARKS.md).
bench: $(STAMP)
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

# Thousands of messages through the relay process while the upstream, Entra ID and the disk
# fail and the relay is killed (loopback only, a few minutes at most; SOAK_ARGS=--help).
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .sandbox build *.egg-info
