#!/usr/bin/env bash
# A second, CPU-only run on the lent 16-core machine after the hot-path changes:
# the smallops sweep to 16 interpreters, 64 vs 4 host threads on 2 interpreters,
# and the dispatch overhead.  Usage there: OUT=<dir> bash benchmarks/device_cpu_rerun.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src" MULTIPY_CACHE="$PWD/.cache"
S=${QUICK:+0.3}; S=${S:-2}
{
  python3 -m multipy bench smallops --max-interpreters "${MAXI:-16}" --threads 1,2,4,8,16 --seconds "$S" \
    --strategies limit,multi_python,threads,jit --csv "$OUT/smallops_cpu16_v2.csv" --plot "$OUT/smallops_cpu16_v2.png"
  python3 -m multipy bench smallops --max-interpreters 2 --threads 4,64 --seconds "$S" --strategies multi_python
  python3 -m multipy bench --overhead --overhead-calls 3000
} 2>&1 | grep -v "━\|^\s*$" > "$OUT/cpu_rerun.log"
tail -c 7000 "$OUT/cpu_rerun.log"
