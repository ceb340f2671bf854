#!/usr/bin/env bash
# Every GPU measurement docs/performance.md reports, in two parts that each fit one 10-minute command, most
# important first (a lent GPU has 15 minutes in all, its start included):
#
#   bash bench/gpu_session.sh main   [RESULTS_DIR]  # training ours vs HF; batch-1 and batch-8 decoding vs HF
#   bash bench/gpu_session.sh levers [RESULTS_DIR]  # a step's profile; each speed lever on/off; DDP at world size 1
#   bash bench/gpu_session.sh smoke  [RESULTS_DIR]  # CPU, tiny configs: checks the script (levers need a GPU's compile)
#
# Results are JSON lines in RESULTS_DIR (default: $OUT if set, else bench/results), named <date>_<gpu>_<part>.jsonl,
# plus a log. Each benchmark has its own time limit, so one that hangs (a compile, say) does not cost the rest.
# PYTHON picks the interpreter (default python3). Exits 1 if any benchmark failed or timed out.
#
# A GPU machine without internet lacks bert4torch: build its wheels here first and carry .whl/ (gitignored)
#   python -m pip wheel --no-deps -w .whl bert4torch==0.6.2 torch4keras==0.3.4 six
# and this script installs them (into /tmp/site) before measuring; without them the bert4torch row is skipped.
set -uo pipefail
part=${1:-}
case "$part" in main|levers|smoke) ;; *) echo "usage: gpu_session.sh main|levers|smoke [RESULTS_DIR]" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${2:-${OUT:-$repo/bench/results}}")  # a relative RESULTS_DIR is taken from where this was called
cd "$repo"
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=0
gpu=$("$py" -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else "cpu")')
stem="$dir/$(date +%F)_${gpu}"
log="${stem}_${part}.log"

step() {  # step SECONDS ARGS...: run one benchmark under a time limit, keep going if it fails
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$py" "$@" 2>&1 | tee -a "$log" || { echo "!! failed or timed out: $*" | tee -a "$log"; failed=1; }
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tee -a "$log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$log"
case "$part" in
  main)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$log"
    step 170 bench/train_throughput.py --systems ours,ours-loader,hf,bert4torch --dest "${stem}_train.jsonl"
    step 200 bench/decode_throughput.py --batches 1 --dest "${stem}_decode.jsonl"
    step 180 bench/decode_throughput.py --batches 8 --systems ours-eager,ours-compiled,hf-static \
      --dest "${stem}_decode.jsonl"
    ;;
  levers)
    step 90 bench/profile_step.py --dest "${stem}_profile.jsonl"
    step 150 bench/decode_throughput.py --batches 1 --systems ours-compiled,ours-compiled-unfused \
      --dest "${stem}_decode_levers.jsonl"
    step 240 bench/train_throughput.py --levers --steps 10 --warmup 3 --dest "${stem}_levers.jsonl"
    step 90 bench/train_throughput.py --systems ours,ours-ddp --steps 10 --warmup 3 --dest "${stem}_ddp.jsonl"
    ;;
  smoke)
    step 300 bench/train_throughput.py --smoke --systems ours,hf --dest "${stem}_train.jsonl"
    step 300 bench/decode_throughput.py --smoke --dest "${stem}_decode.jsonl"
    step 300 bench/train_throughput.py --smoke --systems ours,ours-ddp --dest "${stem}_ddp.jsonl"
    ;;
esac
exit $failed
