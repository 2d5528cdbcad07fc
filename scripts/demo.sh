#!/usr/bin/env bash
# The whole pipeline on embedded defaults (ONNX Runtime on the CPU, an in-process FAISS gallery on
# local disk): synthetic data -> train -> evaluate -> export -> serve -> enroll + search -> shut down.
# DEMO_OUT, DEMO_EPOCHS, DEMO_IDENTITIES and DEMO_PORT shrink or move it (the test suite runs it small).
set -euo pipefail
out=${DEMO_OUT:-demo_out}
epochs=${DEMO_EPOCHS:-30}
identities=${DEMO_IDENTITIES:-80}
port=${DEMO_PORT:-50151}
rm -rf "$out"
mkdir -p "$out"
start=$(date +%s)

echo "== 1/6 synthetic Market-1501-layout data ($identities people, 2 cameras)"
reid make-synthetic "$out/data" --identities "$identities" --cameras 2 --images-per-identity 12 --seed 0

echo "== 2/6 train a small Swin for $epochs epochs on the CPU"
common=(results_dir="$out/results" dataset.train_dataset_dir="$out/data/bounding_box_train"
        dataset.query_dataset_dir="$out/data/query" dataset.test_dataset_dir="$out/data/bounding_box_test"
        dataset.num_classes=$((identities / 2)))
reid train -e specs/demo_synthetic.yaml "${common[@]}" train.num_epochs="$epochs" \
  train.validation_interval="$epochs" train.checkpoint_interval="$epochs" | tee "$out/train.out"
ckpt=$(sed -n 's/^checkpoint: //p' "$out/train.out")

echo "== 3/6 evaluate (mAP/CMC with and without re-ranking, plots)"
reid evaluate -e specs/demo_synthetic.yaml "${common[@]}" evaluate.checkpoint="$ckpt"

echo "== 4/6 export to ONNX (+ FP16 ONNX), each checked against the previous stage"
reid-export --checkpoint "$ckpt" --onnx "$out/model.onnx" --fp16

echo "== 5/6 serve it and search the gallery over gRPC"
reid-serve --model "$out/model.onnx" --port "$port" --gallery-dir "$out/galleries" > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python scripts/demo_search.py "$out/data" --server "127.0.0.1:$port"

echo "== 6/6 shut the server down (SIGTERM: drain, snapshot galleries, exit 0)"
kill -TERM "$server"
wait "$server"
trap - EXIT

echo
echo "== done in $(( $(date +%s) - start )) s; artifacts:"
echo "  data:            $out/data"
echo "  checkpoint:      $ckpt"
echo "  training log:    $out/results/train/metrics.jsonl"
echo "  evaluation:      $out/results/evaluate/results.json"
echo "  CMC curve:       $out/results/evaluate/cmc_curve.png"
echo "  sampled matches: $out/results/evaluate/sampled_matches.png"
echo "  ONNX:            $out/model.onnx and $out/model.fp16.onnx"
echo "  gallery:         $out/galleries/demo"
echo "  server log:      $out/serve.log"
