# The two commands of README.md: `make demo` and `make test`. Each sets up .venv itself on first use.
#
# TORCH is what pip installs for PyTorch first, so that no other package pulls a different build:
# on a CPU-only machine with the local wheel this resolves to that wheel; on a GPU machine to the
# ordinary CUDA build from PyPI. Override it, e.g. `make test TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/talkingshapes/manifest.jsonl
HELDOUT := data/talkingshapes-heldout/manifest.jsonl
RUN := runs/demo-sft

.PHONY: setup demo demo-dpo demo-pose demo-grpo demo-refree test test-slow test-ci test-all base benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

$(DEMO_DATA): $(STAMP)
	$(BIN)/prefalign synth --out data/talkingshapes --num_clips 64 --seed 0

$(HELDOUT): $(STAMP)
	$(BIN)/prefalign synth --out data/talkingshapes-heldout --num_clips 16 --seed 1

# The SFT demo: score the untrained model, train (<= 10 min on 2 cores), score again, animate held-out clips.
demo: $(DEMO_DATA) $(HELDOUT)
	rm -rf $(RUN)
	$(BIN)/prefalign validate --config recipes/demo/sft.yaml
	$(BIN)/prefalign fit --config recipes/demo/sft.yaml
	$(BIN)/prefalign predict --config recipes/demo/sft.yaml --ckpt_path $(RUN)/csv/version_1/checkpoints/last.ckpt \
		--data.predict $(HELDOUT) --trainer.limit_predict_batches 1
	$(BIN)/python benchmarks/plot_run.py $(RUN)

PAIRS := data/talkingshapes-pairs/manifest.jsonl

$(PAIRS): $(STAMP)
	$(BIN)/prefalign synth --out data/talkingshapes-pairs --num_clips 64 --seed 2 --rejected "[shift,jitter,freeze]"

# Flow-DPO from the shipped base checkpoint on TalkingShapes pairs: scores the base model, then aligns it.
demo-dpo: $(PAIRS) $(HELDOUT)
	rm -rf runs/demo-dpo
	$(BIN)/prefalign validate --config recipes/demo/dpo.yaml
	$(BIN)/prefalign fit --config recipes/demo/dpo.yaml
	$(BIN)/python benchmarks/plot_run.py runs/demo-dpo

# The SFT demo with the skeleton (temporal motion modulation): does the generated head follow the keypoints?
demo-pose: $(DEMO_DATA) $(HELDOUT)
	rm -rf runs/demo-sft-pose
	$(BIN)/prefalign validate --config recipes/demo/sft_pose.yaml
	$(BIN)/prefalign fit --config recipes/demo/sft_pose.yaml
	$(BIN)/python benchmarks/plot_run.py runs/demo-sft-pose

# GRPO from the shipped base checkpoint with the composite reward (sync + texture + jitter + identity), then the same
# run with the sync term alone: what the regularizers prevent. Then both, and the base model, on 32 clips of a seed
# that no tuning saw (11).
UNSEEN := data/talkingshapes-unseen/manifest.jsonl

$(UNSEEN): $(STAMP)
	$(BIN)/prefalign synth --out data/talkingshapes-unseen --num_clips 32 --seed 11

SYNC_ONLY := --model.algorithm.init_args.reward.init_args.terms '[{class_path: prefalign.rewards.SyncExpert}]' \
	--model.algorithm.init_args.reward.init_args.weights '{sync: 1.0}'
ON_UNSEEN = $(BIN)/prefalign validate --config recipes/demo/grpo.yaml --data.val $(UNSEEN) --model.val_sample_batches 4 \
	--trainer.logger '[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs/demo-grpo-unseen, name: $(1)}}]'
demo-grpo: $(DEMO_DATA) $(HELDOUT) $(UNSEEN)
	rm -rf runs/demo-grpo runs/demo-grpo-sync runs/demo-grpo-unseen
	$(BIN)/prefalign validate --config recipes/demo/grpo.yaml
	$(BIN)/prefalign fit --config recipes/demo/grpo.yaml
	$(BIN)/prefalign fit --config recipes/demo/grpo.yaml $(SYNC_ONLY) --trainer.default_root_dir runs/demo-grpo-sync \
		--trainer.logger '[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs/demo-grpo-sync, name: csv}}]'
	$(call ON_UNSEEN,base)
	$(call ON_UNSEEN,composite) --ckpt_path runs/demo-grpo/csv/version_1/checkpoints/last.ckpt
	$(call ON_UNSEEN,sync_only) $(SYNC_ONLY) --ckpt_path runs/demo-grpo-sync/csv/version_0/checkpoints/last.ckpt
	$(BIN)/python benchmarks/plot_run.py runs/demo-grpo
	$(BIN)/python benchmarks/plot_run.py runs/demo-grpo-sync

# ReFree from the shipped base checkpoint, then the control: plain (mouth-weighted) SFT for the same steps.
CONTROL := --model.algorithm prefalign.algorithms.SFT --model.algorithm.init_args.mouth_weight 10 \
	--trainer.default_root_dir runs/demo-refree-control \
	--trainer.logger '[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs/demo-refree-control, name: csv}}]'
demo-refree: $(DEMO_DATA) $(HELDOUT)
	rm -rf runs/demo-refree runs/demo-refree-control
	$(BIN)/prefalign validate --config recipes/demo/refree.yaml
	$(BIN)/prefalign fit --config recipes/demo/refree.yaml
	$(BIN)/prefalign fit --config recipes/demo/refree.yaml $(CONTROL)
	$(BIN)/python benchmarks/plot_run.py runs/demo-refree
	$(BIN)/python benchmarks/plot_run.py runs/demo-refree-control

# The fast suite; then the slow one (multi-process runs, the recipe matrix, kill-and-resume); CI runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu"

test-ci: test test-slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

# Regenerates the shipped base checkpoint that the alignment demos start from.
base: demo
	$(BIN)/prefalign export --ckpt_path $(RUN)/csv/version_1/checkpoints/last.ckpt \
		--out data/base/talkingshapes_base.safetensors --dtype float16

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf runs outputs data/talkingshapes benchmarks/out
