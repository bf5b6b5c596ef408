#!/usr/bin/env bash
# The prepared GPU check of the CUDA links (issue 5), for a session lent the GPU machine:
# the GPU tests, then in the same run and on the same card
#   * the per-call cost of a CUDA call through one interpreter, links on and off
#     (MULTIPY_CUDA_LINKS=0 is the per-tensor IPC path the links replace);
#   * resnet on the GPU at batch 1 and 8: plain threads against 1/2/4/8 interpreters
#     (target: 8 interpreters >= 2x the best plain threads at batch 1), and batch 1 with
#     links off as the same-run baseline;
#   * whether CUDA MPS is running (without it the interpreters' contexts time-slice).
# About 6 minutes.  Usage there:  OUT=<dir> bash benchmarks/device_cuda_links.sh   (QUICK=1: shorter)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 MULTIPY_CACHE="$PWD/.cache" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
S=${QUICK:+0.5}; S=${S:-3}
CALLS=${QUICK:+300}; CALLS=${CALLS:-2000}
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
bench() {  # bench NAME VAR=VALUE bench-options...
  timeout 200 env "$2" python3 -m multipy bench resnet --device cuda --threads 1,2,4,8 \
    --max-interpreters 8 --seconds "$S" --csv "$OUT/$1.csv" --plot "$OUT/$1.png" "${@:3}" 2>&1 \
    | grep -v "━\|^\s*$" | tail -30 | tee -a "$LOG"
}

step setup
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "pip install failed" | tee -a "$LOG"
{ nproc; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  pgrep -a nvidia-cuda-mps || echo "no CUDA MPS daemon: the interpreters' CUDA contexts time-slice"; } 2>&1 | tee -a "$LOG"

step gpu tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_link.py \
  tests/test_models.py tests/test_bench.py -k "cuda or gpu or link" 2>&1 | tail -25 | tee -a "$LOG"

step per-call cost of a CUDA call, links on then off
timeout 120 python3 -m multipy bench --overhead --device cuda --overhead-calls "$CALLS" 2>&1 | grep "^overhead" | tee -a "$LOG"
MULTIPY_CUDA_LINKS=0 timeout 120 python3 -m multipy bench --overhead --device cuda --overhead-calls "$CALLS" 2>&1 \
  | grep "^overhead" | sed 's/^/links off: /' | tee -a "$LOG"

step resnet batch 1, links on
bench resnet_cuda_links_b1 MULTIPY_CUDA_LINKS=1 --batch 1 --strategies threads,multi_python,jit
step resnet batch 8, links on
bench resnet_cuda_links_b8 MULTIPY_CUDA_LINKS=1 --batch 8 --strategies threads,multi_python,jit
step resnet batch 1, links off '(same-run baseline)'
bench resnet_cuda_nolinks_b1 MULTIPY_CUDA_LINKS=0 --batch 1 --strategies multi_python
step done
