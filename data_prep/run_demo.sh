#!/usr/bin/env bash
# The whole demo (README, `make demo`): synthetic corpus -> prepared dataset -> trained demo model
# -> sampled mp4s with speech -> faces found, lip-sync scores next to a shuffled-audio control,
# and one contact sheet PNG of every sample.
# Usage: data_prep/run_demo.sh PYTHON OUTDIR. Each stage is skipped when its output exists, so a
# rerun resumes (training resumes from its latest checkpoint).
# A miniature run (tests/test_demo_pipeline.py) sets DEMO_NUM_CLIPS, DEMO_TRAIN_FLAGS (config
# overrides for training, e.g. --config.train.steps=4) and DEMO_SAMPLE_FLAGS (e.g. --steps=2).
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-demo}
CONFIG=configs/demo.py
NUM_CLIPS=${DEMO_NUM_CLIPS:-64}
TRAIN_FLAGS=${DEMO_TRAIN_FLAGS:-}    # word-split on purpose below: flags hold no spaces
SAMPLE_FLAGS=${DEMO_SAMPLE_FLAGS:-}
mkdir -p "$OUT"

echo "== 1/5 demo corpus (synthetic: a real face photo + espeak-ng speech) -> $OUT/corpus"
[ -f "$OUT/corpus/.done" ] || {
  "$PY" -m data_prep.make_demo_corpus --out="$OUT/corpus" --num_clips="$NUM_CLIPS" && touch "$OUT/corpus/.done"; }

echo "== 2/5 prepare: latents, mouth masks, text embeddings -> $OUT/dataset"
[ -f "$OUT/dataset/dataset_info.json" ] || \
  "$PY" -m data_prep.prepare --input="$OUT/corpus" --output="$OUT/dataset" --config=$CONFIG \
    --eval_fraction=0.25 --workers=2

echo "== 3/5 train the demo model -> $OUT/run"
"$PY" -m jova_jax.train --config=$CONFIG --workdir="$OUT/run" --config.data.dir="$OUT/dataset" \
  $TRAIN_FLAGS

echo "== 4/5 sample videos with speech -> $OUT/samples"
# Held-out clips' prompts with their first frame (image-to-video), then text-only prompts.
"$PY" -m data_prep.demo_prompts --config=$CONFIG --dataset="$OUT/dataset" --out="$OUT/prompts.jsonl" \
  --references="$OUT/references"
"$PY" -m jova_jax.sample --workdir="$OUT/run" --prompts="$OUT/prompts.jsonl" --outdir="$OUT/samples" \
  $SAMPLE_FLAGS

echo "== 5/5 did it learn? faces found, lip sync vs a shuffled-audio control, contact sheet"
"$PY" -m data_prep.demo_summary --samples="$OUT/samples" --references="$OUT/references" \
  --prompts="$OUT/prompts.jsonl" --sheet="$OUT/contact_sheet.png"
echo "generated videos:"
ls -1 "$OUT"/samples/*.mp4
