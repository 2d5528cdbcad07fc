#!/usr/bin/env bash
# The whole pipeline on embedded defaults, on a CPU: synthetic data -> training.
# (Evaluation, export and serving join as they land.) DEMO_OUT and DEMO_EPOCHS shrink it for CI.
set -euo pipefail
out=${DEMO_OUT:-demo_out}
epochs=${DEMO_EPOCHS:-12}
rm -rf "$out"
echo "== 1/2 synthetic Market-1501-layout data"
reid make-synthetic "$out/data" --identities 80 --cameras 2 --images-per-identity 12 --seed 0
echo "== 2/2 training (${epochs} epochs)"
reid train -e specs/demo_synthetic.yaml results_dir="$out/results" \
  dataset.train_dataset_dir="$out/data/bounding_box_train" dataset.query_dataset_dir="$out/data/query" \
  dataset.test_dataset_dir="$out/data/bounding_box_test" train.num_epochs="$epochs" | tee "$out/train.out"
ckpt=$(sed -n 's/^checkpoint: //p' "$out/train.out")
echo
echo "== done; artifacts:"
echo "  data:        $out/data"
echo "  checkpoint:  $ckpt"
echo "  metrics log: $out/results/train/metrics.jsonl"
