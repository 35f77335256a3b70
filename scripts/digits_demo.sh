#!/usr/bin/env bash
# The main job on the bundled data, from a fresh machine: set up, write scikit-learn's digits
# as PNG folders, build TFRecords, train and evaluate, export a SavedModel, classify samples.
# Running it again resumes the same model_dir (already at its target step: nothing to train).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
PY=.venv/bin/python

[ -d data/digits_images ] || $PY scripts/make_digits.py --output_dir data/digits_images
$PY scripts/build_tfrecords.py --input_dir data/digits_images --output_dir data/digits \
  --validation_fraction 0.2 --num_shards 2 --seed 0 --overwrite
$PY scripts/train.py --flagfile configs/digits.flags
$PY scripts/evaluate.py --model_dir runs/digits
$PY scripts/export.py --model_dir runs/digits --export_dir runs/digits/export/manual
export_path=$(ls -d runs/digits/export/manual/[0-9]* | sort | tail -n 1)
$PY scripts/predict.py --saved_model "$export_path" \
  data/digits_images/0/0000.png data/digits_images/3/0003.png data/digits_images/7/0007.png
echo "main job done in $(( $(date +%s) - start ))s"
