# The two commands a newcomer needs:  `make demo`  and  `make test`  (each builds .venv first if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT_DIR ?= output
PYTEST_ARGS ?=
# MONAI Label server (`make label`): its own venv (MONAI Label 0.8.5 needs pydicom<3), loopback by default
LABEL_VENV ?= .venv-label
HOST ?= 127.0.0.1
PORT ?= 8000
STUDIES ?=

.PHONY: venv demo test lint bench clean help label label-venv

help:
	@echo "make demo   - build the environment if needed, then run the main job on the synthetic default"
	@echo "make test   - build the environment if needed, then lint and run the whole test suite"
	@echo "make bench  - run the benchmarks (JSON + Markdown + PNG under $(OUTPUT_DIR)/bench)"
	@echo "make label  - build .venv-label if needed, start the MONAI Label server (STUDIES=dir|DICOMweb URL, HOST, PORT)"

venv:
	@VENV=$(VENV) bash tools/setup_env.sh

label-venv:
	@VENV_LABEL=$(LABEL_VENV) bash tools/setup_label_env.sh

label: label-venv
	$(LABEL_VENV)/bin/python -m tools.monailabel.serve --studies "$(STUDIES)" --host "$(HOST)" --port "$(PORT)"

demo: venv
	$(PY) -m tools.demo --output_dir $(OUTPUT_DIR)/demo

lint: venv
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collects nothing: that must fail loudly, never pass as "green".
# label-venv: the MONAI Label server tests (tests/tools/monailabel) run in .venv-label, built once (stamp file).
test: venv label-venv lint
	@$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

bench: venv
	$(PY) -m tools.bench all --out_dir $(OUTPUT_DIR)/bench

clean:
	rm -rf $(OUTPUT_DIR) .pytest_cache .ruff_cache
