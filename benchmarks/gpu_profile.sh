#!/usr/bin/env bash
# Issue 18, step 1 (second GPU run, see ../shared/tools/gpu/README.md): each side alone at one
# level, first unprofiled, then under py-spy (native frames, every thread, child processes,
# idle samples kept so waits show; SPYFLAGS=--nonblocking for a low-overhead pass). Raw collapsed stacks land in $OUT (gzipped);
# benchmarks/profile_summary.py turns them into the breakdown.
#   WHICH=1b|8b LEVEL=64 REPEAT=2 SIDES="a b c" bash benchmarks/gpu_profile.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bash .gpu-wheels/b/install.sh > /dev/null || exit 1
WHICH=${WHICH:-1b}; LEVEL=${LEVEL:-64}; REPEAT=${REPEAT:-2}
mkdir -p /tmp/models
python3 -c "
import sys; sys.path.insert(0, '$PWD')
from benchmarks.gpu_bench import SPECS
from omlx_actors.models import build_demo_model, get_spec
import pathlib
p = pathlib.Path('/tmp/models/llama-$WHICH-bf16')
if not (p / 'omlx_demo.json').exists():
    spec = get_spec('demo-150m').with_(name='llama-$WHICH-bf16', dtype='bfloat16', **SPECS['$WHICH'])
    build_demo_model(spec, p, overwrite=True)
" 2>&1 | grep -v WARNING
spy=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/py-spy
$spy --version || exit 1
model=/tmp/models/llama-$WHICH-bf16
for side in ${SIDES:-a b c}; do
  echo "== $side plain"
  python3 benchmarks/gpu_profile.py $side $model $LEVEL $REPEAT 2>&1 | grep '^{' | tee -a "$OUT/rows_$WHICH.jsonl"
  echo "== $side under py-spy"
  $spy record ${SPYFLAGS:---native --idle} --threads --subprocesses --rate ${RATE:-200} -f raw \
      -o /tmp/prof_${WHICH}_${side}_$LEVEL.txt -- \
      python3 benchmarks/gpu_profile.py $side $model $LEVEL $REPEAT 2>&1 | grep -E '^\{|Error|error' | tail -5
  gzip -c /tmp/prof_${WHICH}_${side}_$LEVEL.txt > "$OUT/prof_${WHICH}_${side}_$LEVEL.txt.gz"
done
ls -la "$OUT"
