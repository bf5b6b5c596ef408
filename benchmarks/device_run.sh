#!/usr/bin/env bash
# The one prepared run on the lent GPU machine (16 cores, one NVIDIA GPU, python3 with
# a CUDA torch): the GPU tests, the GPU benchmark (resnet, batch 1 and 8, plain threads
# against 1/2/4/8 interpreters), the CPU scaling sweep to 16 interpreters, and the
# dispatch-overhead, memory and start-up figures on an idle machine.
# Usage there:  OUT=<dir> bash benchmarks/device_run.sh     (QUICK=1 shortens every step)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 MULTIPY_CACHE="$PWD/.cache" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
S=${QUICK:+0.3}; S=${S:-3}
CPU_S=${QUICK:+0.3}; CPU_S=${CPU_S:-2}
MAXI=${MAXI:-16}
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }

step setup
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "pip install failed" | tee -a "$LOG"
{ nproc; python3 -c "import torch, multipy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; nvidia-smi -L 2>/dev/null; } 2>&1 | tee -a "$LOG"

step smoke
timeout 120 python3 -c "
import torch, multipy
with multipy.InterpreterManager(2) as m:
    with m.acquire_one() as s:
        print('smoke', s.global_('builtins', 'sum')([1, 2]).deref(), s.global_('torch', 'ones')(2).deref())
" 2>&1 | tee -a "$LOG"

step gpu tests
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_models.py tests/test_bench.py -k "cuda or gpu" 2>&1 | tail -25 | tee -a "$LOG"

for B in 1 8; do
  step gpu bench batch $B
  timeout 200 python3 -m multipy bench resnet --device cuda --batch $B --threads 1,2,4,8 --max-interpreters 8 \
    --seconds "$S" --strategies threads,multi_python,jit --csv "$OUT/resnet_cuda_b$B.csv" \
    --plot "$OUT/resnet_cuda_b$B.png" 2>&1 | grep -v "━\|^\s*$" | tail -30 | tee -a "$LOG"
done

step cpu scaling to $MAXI interpreters
timeout 300 python3 -m multipy bench smallops --max-interpreters "$MAXI" --threads 1,2,4,8,16 --seconds "$CPU_S" \
  --strategies limit,one_python,multi_python,jit,threads,process_pool --csv "$OUT/smallops_cpu16.csv" \
  --plot "$OUT/smallops_cpu16.png" 2>&1 | grep -v "━\|^\s*$" | tail -45 | tee -a "$LOG"

step overhead, memory, start-up
timeout 120 python3 -m multipy bench --overhead --overhead-calls 3000 2>&1 | tail -8 | tee -a "$LOG"
timeout 120 python3 -m multipy bench --memory 2>&1 | tail -8 | tee -a "$LOG"
timeout 90 python3 -c "
from multipy.bench.startup import measure_startup
from multipy.bench.targets import resolve_target
r = measure_startup(str(resolve_target('smallops').archive), interpreters=4, repeat=3)
print(f'start-up: import torch {r.import_torch:.2f} s, InterpreterManager(4) + package + every interpreter serving {r.manager_ready:.2f} s, ratio {r.ratio:.2f}')
" 2>&1 | tail -3 | tee -a "$LOG"
step done
