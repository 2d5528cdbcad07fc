#!/usr/bin/env bash
# What this install does on an NVIDIA GPU, in one run: the GPU-marked tests, the training step's
# throughput with mixed precision, k-reciprocal re-ranking on the GPU against the CPU path, given
# an ONNX model and onnxruntime-gpu the serving benchmark on the GPU (the batching gain) and, given
# a dataset in Market-1501 layout, a short ResNet-50 training run and its mAP.
#
# Every step runs even when an earlier one failed, and each writes its own log into OUT_DIR;
# OUT_DIR/summary.txt lists each step's exit status, seconds and headline figures. Exits 0 when
# every step passed, 1 when any failed, 2 when there is no CUDA device (before running anything).
#
#   scripts/gpu_check.sh OUT_DIR [DATASET_DIR]
#
# Environment (defaults in brackets):
#   PYTHON [python3]                     the interpreter that has this package and torch
#   GPU_CHECK_EPOCHS [40]                training epochs on DATASET_DIR
#   GPU_CHECK_SPEC [specs/resnet50_market.yaml]
#   GPU_CHECK_OVERRIDES []               extra key.sub=value overrides for its training and evaluation
#   GPU_CHECK_BACKBONES [resnet_50 swin_tiny_patch4_window7_224]
#   GPU_CHECK_BATCH [64] GPU_CHECK_STEPS [20]    for the training-step benchmark
#   GPU_CHECK_RERANK_SIZE ["3368 19732"]          queries and gallery for the re-ranking benchmark
#   GPU_CHECK_MODEL []                   an ONNX model for the serving benchmark (skipped without one)
#   GPU_CHECK_SERVE_ARGS []              more benchmarks/serve.py options (e.g. --pixel-mean/--pixel-std)
#   GPU_CHECK_ONLY [all]                 the steps to run, by name (e.g. "train evaluate")
#   GPU_CHECK_ALLOW_CPU [0]              1 runs every step on the CPU (to test this script)
set -uo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR [DATASET_DIR]" >&2
  exit 2
fi
out=$1
data=${2:-}
py=${PYTHON:-python3}
epochs=${GPU_CHECK_EPOCHS:-40}
spec=${GPU_CHECK_SPEC:-specs/resnet50_market.yaml}
read -r -a backbones <<< "${GPU_CHECK_BACKBONES:-resnet_50 swin_tiny_patch4_window7_224}"
read -r -a rerank_size <<< "${GPU_CHECK_RERANK_SIZE:-3368 19732}"
read -r -a overrides <<< "${GPU_CHECK_OVERRIDES:-}"
read -r -a serve_args <<< "${GPU_CHECK_SERVE_ARGS:-}"
model=${GPU_CHECK_MODEL:-}
if [[ -n $model && ! -f $model ]]; then
  echo "gpu_check: GPU_CHECK_MODEL $model is not a file" >&2
  exit 2
fi
if [[ -n $data && ! -d $data/bounding_box_train ]]; then
  echo "gpu_check: $data has no bounding_box_train folder; give a dataset in Market-1501 layout" >&2
  exit 2
fi
steps="environment gpu-tests train-step rerank serve train evaluate"
for name in ${GPU_CHECK_ONLY:-}; do
  if [[ " $steps " != *" $name "* ]]; then
    echo "gpu_check: GPU_CHECK_ONLY names no step '$name'; the steps are $steps" >&2
    exit 2
  fi
done
mkdir -p "$out" || exit 2
# The steps run from the repository root: paths given relative to the caller's folder become absolute.
out=$(cd "$out" && pwd)
[[ -z $data ]] || data=$(cd "$data" && pwd)
[[ -z $model ]] || model=$(cd "$(dirname "$model")" && pwd)/$(basename "$model")
cd "$(dirname "$0")/.." || exit 2
summary=$out/summary.txt
: > "$summary"

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [[ ${GPU_CHECK_ALLOW_CPU:-0} != 1 ]]; then
    echo "gpu_check: $py sees no CUDA device (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
  fi
  device=torch:cpu  # the re-ranking step then runs the GPU code path on torch's CPU device
  serve_device=cpu
else
  device=cuda
  serve_device=cuda
  $py -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" \
    2>/dev/null || serve_device=""
fi

failed=0
only=" ${GPU_CHECK_ONLY:-} "
selected() { [[ $only == "  " || $only == *" $1 "* ]]; }
# step NAME COMMAND...: runs COMMAND with its output in OUT_DIR/NAME.log and adds a summary line.
step() {
  local name=$1 start rc
  shift
  selected "$name" || return 0
  echo "== $name: $*"
  start=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  (( rc == 0 )) || failed=1
  printf '%-16s exit %-3s %5s s\n' "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$summary"
}
# skip NAME WHY: the summary line of a step that cannot run here.
skip() { selected "$1" && printf '%-16s skipped: %s\n' "$1" "$2" | tee -a "$summary"; }

step environment bash -c "nvidia-smi -L 2>&1; $py -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no device\")'"
step gpu-tests "$py" -m pytest -m gpu -rs -q -p no:cacheprovider tests
step train-step "$py" benchmarks/train_throughput.py --height 256 --width 128 --batch "${GPU_CHECK_BATCH:-64}" \
  --steps "${GPU_CHECK_STEPS:-20}" --workers 8 --backbones "${backbones[@]}"
step rerank "$py" benchmarks/rerank.py --queries "${rerank_size[0]}" --gallery "${rerank_size[1]}" --dims 256 \
  --skip-oracle --devices cpu "$device"
if [[ -z $model ]]; then
  skip serve "no GPU_CHECK_MODEL"
elif [[ -z $serve_device ]]; then
  skip serve "onnxruntime has no CUDA provider (install onnxruntime-gpu)"
else
  step serve "$py" benchmarks/serve.py "$model" --device "$serve_device" --instances 1 --batching on off \
    --clients 1 16 64 --crops 1 8 --seconds 4 "${serve_args[@]}"
fi

if [[ -n $data ]]; then
  classes=$($py -c "import sys; from training.data.market1501 import load_train; print(len({r.pid for r in load_train(sys.argv[1])}))" \
    "$data/bounding_box_train") || classes=0
  paths=(results_dir="$out/train" dataset.train_dataset_dir="$data/bounding_box_train"
         dataset.query_dataset_dir="$data/query" dataset.test_dataset_dir="$data/bounding_box_test"
         dataset.num_classes="$classes" "${overrides[@]}")
  step train "$py" -m training.cli train -e "$spec" "${paths[@]}" train.num_epochs="$epochs" \
    train.checkpoint_interval="$epochs"
  ckpt=$(sed -n 's/^checkpoint: //p' "$out/train.log" | tail -n 1)
  step evaluate "$py" -m training.cli evaluate -e "$spec" "${paths[@]}" evaluate.checkpoint="${ckpt:-missing}" \
    re_ranking.re_ranking=False
fi

{
  echo
  grep -h "^device:\|images/s" "$out/train-step.log" 2>/dev/null
  grep -h "against" "$out/rerank.log" 2>/dev/null
  grep -h "engine best overall\|^  server, \|clients x 1 crops" "$out/serve.log" 2>/dev/null
  grep -h "passed\|skipped\|failed\|SKIPPED" "$out/gpu-tests.log" 2>/dev/null
  [[ -n $data ]] && grep -h "mAP" "$out/evaluate.log" 2>/dev/null
} | tee -a "$summary"
exit "$failed"
