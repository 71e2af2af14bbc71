# The two commands a newcomer needs:  `make demo`  and  `make test`  (each builds .venv first if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT_DIR ?= output
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean help

help:
	@echo "make demo   - build the environment if needed, then run the main job on the synthetic default"
	@echo "make test   - build the environment if needed, then lint and run the whole test suite"
	@echo "make bench  - run the benchmarks (JSON + Markdown + PNG under $(OUTPUT_DIR)/bench)"

venv:
	@VENV=$(VENV) bash tools/setup_env.sh

demo: venv
	$(PY) -m tools.demo --output_dir $(OUTPUT_DIR)/demo

lint: venv
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects nothing: that must fail loudly, never pass as "green"
test: venv lint
	@$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

bench: venv
	$(PY) -m tools.bench all --out_dir $(OUTPUT_DIR)/bench

clean:
	rm -rf $(OUTPUT_DIR) .pytest_cache .ruff_cache
