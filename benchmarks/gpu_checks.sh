#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run, on a single-GPU machine whose python3 has PyTorch with
# CUDA plus this project's dependencies (or PYTHONPATH pointing at them):
#
#     OUT=outputs/gpu bash benchmarks/gpu_checks.sh
#
# Writes to $OUT: gpu.log (machine), tests.log (pipeline/model/format tests; most build their models on
# the CPU, test_cuda_latents_equal_cpu compares CUDA fp32/bf16 with the CPU), generate.log (bench_generate.py on cuda: fp32/bf16/fp16
# against diffusers fp32, 256 and 512 px), eval.log (the bundled nano nets scored in fp32 and bf16 on
# the same 200 held-out samples and seeds), train.log (bench_train.py on cuda).
# Each step has its own time limit so one slow step cannot eat the others.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  nproc
} 2>&1 | tee "$OUT/gpu.log"

timeout 90 $PY -m pytest -x -p no:cacheprovider -rs tests/pipeline tests/models tests/formats tests/test_base.py \
  2>&1 | tail -30 | tee "$OUT/tests.log"
echo "pytest exit code: $?" | tee -a "$OUT/tests.log"

timeout 120 $PY benchmarks/bench_generate.py --device cuda --resolutions 256,512 --steps 20 2>&1 \
  | grep -v "^\[transformers\]" | tee "$OUT/generate.log"
echo "bench_generate exit code: $?" | tee -a "$OUT/generate.log"

# the first 200 held-out samples (identical to the first 200 of `--n 1000 --seed 1`)
[ -d data/shapes-val ] || $PY -m ctrlnet.cli data shapes --n 200 --seed 1 --out data/shapes-val > /dev/null 2>&1
EVAL=$(mktemp -d)
for dtype in fp32 bf16; do
  timeout 60 $PY -m ctrlnet.cli eval --control model=nano-canny,annotator=canny --data data/shapes-val --n 200 \
    --no-baseline --dtype $dtype --out "$EVAL/canny-$dtype" 2>&1 | tail -3
  timeout 60 $PY -m ctrlnet.cli eval --control model=nano-segmentation,condition=segmentation \
    --data data/shapes-val --n 200 --no-baseline --dtype $dtype --out "$EVAL/seg-$dtype" 2>&1 | tail -3
done
for r in "$EVAL"/*; do
  echo "== $r"
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['settings']['dtype'], d['seconds'],
json.dumps([x['metrics'] for x in d['results']]))" "$r/report.json"
done 2>&1 | tee "$OUT/eval.log"

timeout 150 $PY benchmarks/bench_train.py --device cuda --steps 10 \
  --modes diffusers-recipe,ctrlnet-fp32,ctrlnet-bf16,unet-finetune 2>&1 | grep -v "^\[transformers\]" \
  | tee "$OUT/train.log"
echo "bench_train exit code: $?" | tee -a "$OUT/train.log"
