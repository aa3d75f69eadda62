#!/usr/bin/env bash
# Second GPU run (see ../shared/tools/gpu/README.md): install, build the ~8B model in the
# background while the ~1B benchmark runs, then benchmark the ~8B one. WHICH=1b or WHICH=8b
# runs one of them (two calls, each under the device's per-call limit, on a warm machine);
# REPEAT runs per side and level (median kept, default 3).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bash .gpu-wheels/b/install.sh > /dev/null || exit 1
mkdir -p /tmp/models
[ -e /tmp/models/llama-8b-bf16/omlx_demo.json ] || setsid nohup python3 -c "
import sys; sys.path.insert(0, '$PWD')
from benchmarks.gpu_bench import SPECS
from omlx_actors.models import build_demo_model, get_spec
spec = get_spec('demo-150m').with_(name='llama-8b-bf16', dtype='bfloat16', **SPECS['8b'])
build_demo_model(spec, '/tmp/models/llama-8b-bf16', overwrite=True)
print('built 8b', flush=True)
" > /tmp/build8b.log 2>&1 < /dev/null &
if [ "${WHICH:-1b}" = 1b ]; then
  python3 benchmarks/gpu_bench.py 1b /tmp/models "$OUT/gpu_1b.json" "${GIL:-0.0002}" "${REPEAT:-3}" 2>&1 | grep -v WARNING | tee "$OUT/gpu_1b.log"
fi
if [ -z "${WHICH:-}" ] || [ "$WHICH" = 8b ]; then
  while [ ! -e /tmp/models/llama-8b-bf16/omlx_demo.json ]; do sleep 5; done
  cat /tmp/build8b.log
  python3 benchmarks/gpu_bench.py 8b /tmp/models "$OUT/gpu_8b.json" "${GIL:-0.0002}" "${REPEAT:-3}" 2>&1 | grep -v WARNING | tee "$OUT/gpu_8b.log"
fi
