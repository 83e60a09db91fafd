# Semantic-segmentation contest pipeline.  `make help` lists targets and variables.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

DATA_DIR ?= data/demo
ARGS     ?=
FOLD     ?= 0
K        ?= 5
TOP_K    ?=
SEED     ?= 42
MODEL    ?= unet
CONFIG   ?=
RESUME   ?= 1
FOLDS_FILE ?= folds/folds.csv
# the experiment: runs/EXP/fold<k>/ (train writes it, predict reads it); with CONFIG, the file's own
# `experiment:` (a tune-report best.yaml names its study) or else its file name; without, MODEL
EXP      ?= $(if $(CONFIG),$(or $(shell sed -n 's/^experiment: *\([^ #]*\).*/\1/p' $(CONFIG) 2>/dev/null | grep -v '^null$$' | tail -1),$(basename $(notdir $(CONFIG)))),$(MODEL))
RUN      ?= runs/$(EXP)/fold$(FOLD)
RUNS     ?=
TTA      ?= flip
SPLIT    ?= test
NAME     ?= submission
FORMAT   ?= auto
SUB      ?= submissions/$(NAME).csv
GT       ?= $(DATA_DIR)/test_gt.json
STUDY    ?= demo
BUDGET   ?= 20m
# make all / make plan: GPUs that run the plan's independent jobs side by side (empty: every visible one)
GPUS     ?=
# make plan: a device profile (pipeline/configs/devices/NAME.yaml or a file; empty: probe this machine)
# and a dataset fingerprint (pipeline/configs/fingerprints/NAME.yaml or a file; empty: read DATA_DIR)
DEVICE_PROFILE ?=
FINGERPRINT ?=
THRESHOLD ?= 0.9
TRIALS   ?= 4
PNG      ?= 0
IMAGES   ?=
STORAGE  ?=
# tuning profile: full (pipeline/configs/search_space.yaml, the family configs' budgets) or
# demo (a small space and short trials for the demo data on a CPU); chosen explicitly
PROFILE  ?= full
SPACE    ?= $(if $(filter demo,$(PROFILE)),pipeline/configs/search_space_demo.yaml,)
TUNE_TRAIN_ARGS ?= $(if $(filter demo,$(PROFILE)),encoder_weights=null num_workers=0 max_train_batches=8,)

# pretrained weights: the folder looked at first (make weights fills it), then the HF / torch caches,
# the installed weight packages, a download; offline with none of them, training starts from scratch
WEIGHTS_DIR ?= weights
ENCODERS ?=
FROM     ?=
ENCODER  ?=
comma := ,
empty :=
space := $(empty) $(empty)

# what the lent GPU machine's image lacks (Python 3.12, x86-64), one version each, carried as wheels in .whl/:
# the pipeline's own needs and theirs (Requires-Dist) that the image does not hold (typing-extensions:
# pydantic needs >= 4.16, newer than the image may have)
GPU_WHEELS ?= segmentation-models-pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 \
  simsimd==6.5.16 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 pycocotools==2.0.11 optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 mako==1.4.3 \
  colorlog==6.12.0
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))

# make bundle: the folder a Kaggle notebook attaches as a dataset (pipeline/bundle.py): the wheels of the
# pipeline and of what the Kaggle image lacks (worked out from pipeline/configs/images/kaggle.yaml), a copy of
# WEIGHTS_DIR (ENCODERS= or FROM= run make weights first) and kaggle.ipynb
BUNDLE_DIR ?= bundle

# the end-to-end demo job: `make all` on the generated demo data within this budget
DEMO_BUDGET ?= 6m

# train layers defaults < base.yaml < the model's family overlay < CONFIG < ARGS itself (pipeline/engine/train_config.py)
train_config = $(if $(CONFIG),--config $(CONFIG))
train_model  = $(if $(CONFIG),,model=$(MODEL)) experiment=$(EXP)
resume_flag  = resume=$(if $(filter 0 false no,$(RESUME)),false,true)
# ARGS reach a stage as one quoted string (--args), split there into key=value items, so values
# with spaces (ARGS="loss_options={classes: present}") stay whole
args = $(if $(strip $(ARGS)),--args '$(subst ','\'',$(ARGS))')
truthy = $(filter 1 true yes on,$(1))

.PHONY: help setup data weights eda folds train train-folds predict predict-folds average pseudo analyze ensemble submit validate score tune tune-report plan all bundle demo lint test test-fast bench gpu-check gpu-wheels clean

help: ## list targets and their variables
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-13s %s\n", $$1, $$2}'
	@echo
	@echo "Variables (current value):"
	@echo "  DATA_DIR=$(DATA_DIR)  contest-layout data folder (default: the generated demo data)"
	@echo "  ARGS=\"key=value ...\"    overrides of the stage's config (values may hold spaces: ARGS=\"loss_options={classes: present}\");"
	@echo "                        python -m pipeline.<stage> --help lists every key with type, default and meaning, --print-config the result"
	@echo "  FOLD=$(FOLD) K=$(K) SEED=$(SEED) FOLDS_FILE=$(FOLDS_FILE)  (folds, train: K is the fold count)"
	@echo "  MODEL=$(MODEL) CONFIG=$(CONFIG) RESUME=$(RESUME)  (train: base.yaml < pipeline/configs/<MODEL>.yaml < CONFIG < ARGS;"
	@echo "                        a changed config never resumes an old run: EXP=<new name>, or RESUME=0 moves the old run aside)"
	@echo "  family configs (MODEL=): $(filter-out base search_space search_space_demo,$(basename $(notdir $(wildcard pipeline/configs/*.yaml))))"
	@echo "  EXP=$(EXP)  experiment name: train writes runs/EXP/fold<k>/ (default: MODEL, or CONFIG's experiment: or file name)"
	@echo "  WEIGHTS_DIR=$(WEIGHTS_DIR)  pretrained weights folder: <encoder>.safetensors (train, all, weights)"
	@echo "  ENCODERS=\"tu-convnext_tiny resnet50\"  (weights: download)  FROM=<file>|lite0|lite1|lite2 ENCODER=<name>  (weights: convert; FROM=<folder>: a whole model's .bin to .safetensors)"
	@echo "  RUN=$(RUN) TTA=$(TTA) SPLIT=$(SPLIT)  (predict, average)  PNG=$(PNG)  (predict: 1 writes label-map PNGs and overlays)"
	@echo "  IMAGES=$(IMAGES)  (predict: a folder of images to predict instead of SPLIT; with PNG=1)"
	@echo "  TOP_K=$(TOP_K)  (average: how many best epochs; default 3)"
	@echo "  RUNS=\"runs/a runs/b\"  (ensemble, submit, analyze): experiment folders (all their folds form one member) or run folders"
	@echo "  NAME=$(NAME) FORMAT=$(FORMAT) SUB=$(SUB) GT=$(GT)  (submit, validate, score, all; FORMAT=auto|rle|dense,"
	@echo "                        auto: the header of DATA_DIR/sample_submission.csv, else rle)"
	@echo "  THRESHOLD=$(THRESHOLD)  (pseudo: confidence a pixel needs to be labelled)"
	@echo "  BUDGET=$(BUDGET)  wall time of make all after set-up (20m, 2h, 1h30m, 90s)  DEMO_BUDGET=$(DEMO_BUDGET)  (demo)"
	@echo "  GPUS=$(GPUS)  (all, plan: GPUs running the plan's jobs side by side, one process each; empty: every visible one)"
	@echo "  STUDY=$(STUDY) TRIALS=$(TRIALS) STORAGE=$(STORAGE) SPACE=$(SPACE)  (tune; CONFIG= too: the trials' base config)"
	@echo "  PROFILE=$(PROFILE)  tuning profile: full | demo (small space, short CPU trials: SPACE and TUNE_TRAIN_ARGS)"
	@echo "  TUNE_TRAIN_ARGS=\"$(TUNE_TRAIN_ARGS)\"  extra key=value for every trial's training config"
	@echo "  PYTHON_BIN=$(PYTHON_BIN) VENV=$(VENV)  (setup: the interpreter that creates the virtual environment, and its folder)"
	@echo "  BUNDLE_DIR=$(BUNDLE_DIR)  (bundle: the Kaggle dataset folder; WEIGHTS_DIR is copied in, ENCODERS=/FROM= fill it first)"
	@echo "  GPU_WHEELS=...  (gpu-wheels: the packages carried to a lent GPU machine)"

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON_BIN) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the package (pyproject.toml) with its extras

data: setup ## generate the demo dataset (ARGS: n_train= n_test= height= width= seed=)
	$(PY) -m pipeline.demo out_dir=$(DATA_DIR) overwrite=true $(args)

weights: setup ## fill WEIGHTS_DIR for offline machines: ENCODERS="a b" downloads; FROM=<file>|lite0 ENCODER=<name> or FROM=<folder> converts
	$(PY) -m pipeline.prepare_weights weights_dir=$(WEIGHTS_DIR) $(if $(strip $(ENCODERS)),encoders=[$(subst $(space),$(comma),$(strip $(ENCODERS)))]) $(if $(FROM),source=$(FROM)) $(if $(ENCODER),encoder=$(ENCODER)) $(args)

eda: setup ## EDA report and plots -> reports/eda/
	$(PY) -m pipeline.eda data_dir=$(DATA_DIR) $(args)

folds: setup ## stratified k-fold split -> folds/folds.csv (K=, SEED=)
	$(PY) -m pipeline.folds data_dir=$(DATA_DIR) k=$(K) seed=$(SEED) out_dir=$(dir $(FOLDS_FILE)) $(args)

train: setup ## train MODEL (or CONFIG) on FOLD -> runs/<experiment>/fold<k>/
	$(PY) -m pipeline.train $(train_config) data_dir=$(DATA_DIR) folds_file=$(FOLDS_FILE) fold=$(FOLD) weights_dir=$(WEIGHTS_DIR) $(train_model) $(resume_flag) $(args)

train-folds: setup ## train MODEL (or CONFIG) on every fold of FOLDS_FILE
	@for f in $$($(PY) -c "import pandas as p; print(*sorted(p.read_csv('$(FOLDS_FILE)').fold.unique()))"); do \
	  $(MAKE) --no-print-directory train FOLD=$$f || exit $$?; done

predict: setup ## predict RUN's best checkpoint with TTA on SPLIT (test|val) -> RUN/test_<tta>/ or RUN/oof_<tta>/; PNG=1: label maps + overlays (IMAGES=<folder>: of those images)
	$(PY) -m pipeline.predict run_dir=$(RUN) data_dir=$(DATA_DIR) tta=$(TTA) split=$(SPLIT) $(if $(call truthy,$(PNG)),png=true) $(if $(IMAGES),images=$(IMAGES)) $(args)

predict-folds: setup ## predict every fold folder of EXP (runs/EXP/fold*/) with TTA on SPLIT, as predict does one
	@set -e; runs=$$(ls -d runs/$(EXP)/fold*/ 2>/dev/null); [ -n "$$runs" ] || { echo "runs/$(EXP)/: no fold*/ folders (make train-folds EXP=$(EXP) first)" >&2; exit 2; }; \
	for d in $$runs; do $(MAKE) --no-print-directory predict RUN=$${d%/}; done

average: setup ## average RUN's TOP_K best epochs (trained with keep_top_k>=TOP_K; default 3) -> RUN/averaged.pt
	$(PY) -m pipeline.average run_dir=$(RUN) $(if $(TOP_K),k=$(TOP_K)) $(args)

ensemble: setup ## tune weights of RUNS on out-of-fold predictions and average their test probabilities
	$(PY) -m pipeline.ensemble runs="$(RUNS)" data_dir=$(DATA_DIR) name=$(NAME) $(args)

pseudo: setup ## pseudo-labels of the test images from ensemble NAME (THRESHOLD=0.9) -> pseudo/NAME/ (train with ARGS="pseudo_dir=pseudo/NAME")
	$(PY) -m pipeline.pseudo name=$(NAME) data_dir=$(DATA_DIR) threshold=$(THRESHOLD) $(args)

analyze: setup ## error analysis of RUNS (or ensemble NAME) on OOF -> reports/analyze/<name>/ (PNG panels, label-error ranking)
	$(PY) -m pipeline.analyze $(if $(RUNS),runs="$(RUNS)",name=$(NAME)) data_dir=$(DATA_DIR) $(args)

submit: setup ## write submissions/NAME.csv from ensemble NAME or RUNS="runs/<exp> ..." (FORMAT=auto|rle|dense) and validate it
	$(PY) -m pipeline.submit name=$(NAME) format=$(FORMAT) data_dir=$(DATA_DIR) $(if $(strip $(RUNS)),runs="$(strip $(RUNS))") $(args)

validate: setup ## check a submission file SUB against DATA_DIR/test.json
	$(PY) -m pipeline.validate sub=$(SUB) data_dir=$(DATA_DIR) $(args)

score: setup ## mIoU of SUB against ground truth GT (COCO json or folder of label maps)
	$(PY) -m pipeline.score sub=$(SUB) gt=$(GT) data_dir=$(DATA_DIR) $(args)

tune: setup ## Optuna study STUDY with TRIALS trials (FOLD=, SPACE=, STORAGE=)
	$(PY) -m pipeline.tune study=$(STUDY) trials=$(TRIALS) fold=$(FOLD) data_dir=$(DATA_DIR) folds_file=$(FOLDS_FILE) $(if $(SPACE),space=$(SPACE)) $(if $(STORAGE),storage=$(STORAGE)) $(if $(CONFIG),base_config=$(CONFIG)) $(if $(TUNE_TRAIN_ARGS),train_args="$(TUNE_TRAIN_ARGS)") $(args)

tune-report: setup ## report of study STUDY -> reports/tune/<study>/ (with best.yaml)
	$(PY) -m pipeline.tune_report study=$(STUDY) $(if $(STORAGE),storage=$(STORAGE)) $(args)

plan: setup ## print the plan of a budgeted run without training (BUDGET=, DEVICE_PROFILE=, FINGERPRINT=, NAME=): work/NAME/plan.json
	$(PY) -m pipeline.plan data_dir=$(DATA_DIR) budget=$(BUDGET) name=$(NAME) weights_dir=$(WEIGHTS_DIR) $(if $(GPUS),gpus=$(GPUS)) $(if $(DEVICE_PROFILE),device_profile=$(DEVICE_PROFILE)) $(if $(FINGERPRINT),fingerprint=$(FINGERPRINT)) $(args)

all: setup ## budgeted run DATA_DIR -> validated submission within BUDGET (NAME=, FORMAT=, GT=): work/NAME/, submissions/NAME.csv
	$(PY) -m pipeline.autopilot data_dir=$(DATA_DIR) budget=$(BUDGET) name=$(NAME) format=$(FORMAT) weights_dir=$(WEIGHTS_DIR) $(if $(GPUS),gpus=$(GPUS)) $(if $(filter-out $(DATA_DIR)/test_gt.json,$(GT)),gt=$(GT)) $(args)

bundle: setup ## the folder to attach to a Kaggle notebook as a dataset -> BUNDLE_DIR/ (wheels/, weights/ = WEIGHTS_DIR, kaggle.ipynb, manifest.json)
	$(if $(or $(strip $(ENCODERS)),$(FROM)),$(MAKE) --no-print-directory weights ARGS=)
	$(PY) -m pipeline.bundle out_dir=$(BUNDLE_DIR) weights_dir=$(WEIGHTS_DIR) $(args)

demo: setup ## the main job on generated demo data: data -> EDA -> make all (folds, probe, plan, train, TTA on OOF, ensemble, submit, score) in DEMO_BUDGET
	$(MAKE) --no-print-directory data ARGS=
	$(MAKE) --no-print-directory eda ARGS=
	$(MAKE) --no-print-directory all DATA_DIR=data/demo BUDGET=$(DEMO_BUDGET) NAME=demo FORMAT=rle

lint: setup ## ruff: lint rules (E, F, I, B, UP) and formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint ## lint, then the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: setup ## run the tests without the slow ones
	$(PY) -m pytest -q -m "not slow"

bench: setup ## run every benchmark (its table; its figures as JSON in reports/bench/), then one table of all their goals
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit $$?; done
	@echo "== summary"; $(PY) benchmarks/results.py

gpu-check: setup ## the GPU proof (benchmarks/gpu_check.py -> reports/gpu_check.json); ARGS="--smoke" on a CPU, "--only SECTION"
	$(PY) benchmarks/gpu_check.py $(ARGS)

gpu-wheels: ## download the wheels the lent GPU machine lacks (Python 3.12, x86-64) into .whl/ (see README: GPU check)
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $(WHEEL_PLATFORMS) -d .whl $(GPU_WHEELS)
	@ls .whl; du -sh .whl

clean: ## remove generated runs, reports, caches, workspaces, ensembles, pseudo-labels (keeps data/, submissions/ and .venv)
	rm -rf runs reports .cache studies work ensembles pseudo
