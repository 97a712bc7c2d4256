# semiseg — two commands on a fresh machine:
#   make demo   install, generate the demo data, train supervised, U2PL and UniMatch at 1/16 labels,
#               compare them and draw a contact sheet
#   make test   install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.semiseg-installed
# torch/torchvision pinned to what this machine serves; pyproject.toml declares the ranges.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# The demo's labeled share (bench/demo_seeds.py reads it here) and extra `train` options, e.g.
# DEMO_ARGS="--iters 200" for a quicker look (the README's figures are at the presets' 800).
DEMO_LABELED ?= 1/16
DEMO_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[export,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m semiseg_cli demo-data --out demo_data
	$(PY) -m semiseg_cli prepare-splits --dataset demo --root demo_data --labeled $(DEMO_LABELED) --seed 0 --out splits/demo --overwrite
	$(PY) -m semiseg_cli train --preset supervised_r18-os16_1x8-800it_demo-64 $(DEMO_ARGS) \
	    --labeled-list splits/demo/labeled.txt --out runs/demo-supervised --overwrite
	$(PY) -m semiseg_cli train --preset u2pl_r18-os16_1x8+8-800it_demo-64 $(DEMO_ARGS) \
	    --labeled-list splits/demo/labeled.txt --unlabeled-list splits/demo/unlabeled.txt --out runs/demo-u2pl --overwrite
	$(PY) -m semiseg_cli train --preset unimatch_r18-os16_1x8+8-800it_demo-64 $(DEMO_ARGS) \
	    --labeled-list splits/demo/labeled.txt --unlabeled-list splits/demo/unlabeled.txt --out runs/demo-unimatch --overwrite
	$(PY) -m semiseg_cli eval -c runs/demo-supervised/last.pt --json runs/demo-supervised/eval.json --overwrite
	$(PY) -m semiseg_cli eval -c runs/demo-u2pl/last.pt --json runs/demo-u2pl/eval.json --overwrite
	$(PY) -m semiseg_cli eval -c runs/demo-unimatch/last.pt --json runs/demo-unimatch/eval.json --overwrite
	$(PY) -m semiseg_cli compare runs/demo-supervised runs/demo-u2pl runs/demo-unimatch
	$(PY) -m semiseg_cli show -c runs/demo-supervised/last.pt -c runs/demo-u2pl/last.pt -c runs/demo-unimatch/last.pt \
	    --out runs/demo-sheet.png --overwrite

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_train_step.py --preset supervised_mbv2-os16_1x4-300it_camvid-176x224 --device cpu

clean:
	rm -rf runs splits demo_data .pytest_cache
