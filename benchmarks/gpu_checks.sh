#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, on a single-GPU machine whose python3 has PyTorch with CUDA plus
# this project's dependencies (or PYTHONPATH pointing at them):
#
#     OUT=outputs/gpu bash benchmarks/gpu_checks.sh                 # every step (at most ~21 min)
#     OUT=outputs/gpu STEPS="tests compiled" bash benchmarks/gpu_checks.sh   # some of them
#
# Steps (each with its own time limit, so one slow step cannot eat the others), and what they write
# to $OUT besides gpu.log (the machine):
#   tests     tests.log: pipeline/model/format tests (most build their models on the CPU;
#             test_cuda_latents_equal_cpu and test_cuda_graphs_give_the_same_latents run on CUDA)
#   generate  generate.log: bench_generate.py on cuda, fp32/bf16/fp16 against diffusers fp32, 256/512 px
#   compiled  generate-compiled.log: the same in bf16, eager and Pipeline(compile=True) (inductor, CUDA graphs)
#   eval      eval.log: the bundled nano nets scored in fp32 and bf16 on the same 200 held-out samples
#   train     train.log: bench_train.py on cuda
set -uo pipefail
OUT=${OUT:-outputs/gpu}
PY=${PY:-python3}
STEPS=${STEPS:-tests generate compiled eval train}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
want() { [[ " $STEPS " == *" $1 "* ]]; }
for s in $STEPS; do
  case $s in tests|generate|compiled|eval|train) ;; *) echo "unknown step '$s': use tests generate compiled eval train" >&2; exit 2;; esac
done
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  nproc
} 2>&1 | tee "$OUT/gpu.log"

if want tests; then
  timeout 240 $PY -m pytest -x -p no:cacheprovider -rs tests/pipeline tests/models tests/formats tests/test_base.py \
    2>&1 | tail -30 | tee "$OUT/tests.log"
  echo "pytest exit code: $?" | tee -a "$OUT/tests.log"
fi

if want generate; then
  timeout 120 $PY benchmarks/bench_generate.py --device cuda --resolutions 256,512 --steps 20 2>&1 \
    | grep -v "^\[transformers\]" | tee "$OUT/generate.log"
  echo "bench_generate exit code: $?" | tee -a "$OUT/generate.log"
fi

if want compiled; then
  # bf16 through torch.compile(mode="reduce-overhead") (CUDA graphs) against diffusers fp32 in the same
  # run: the launch overhead that kept eager bf16 under 1.7x; first_call_s includes the compiling
  timeout 480 $PY benchmarks/bench_generate.py --device cuda --resolutions 512,256 --steps 20 --repeat 2 \
    --dtypes bf16 --compile 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/generate-compiled.log"
  echo "bench_generate --compile exit code: $?" | tee -a "$OUT/generate-compiled.log"
fi

if want eval; then
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
fi

if want train; then
  timeout 150 $PY benchmarks/bench_train.py --device cuda --steps 10 \
    --modes diffusers-recipe,ctrlnet-fp32,ctrlnet-bf16,unet-finetune 2>&1 | grep -v "^\[transformers\]" \
    | tee "$OUT/train.log"
  echo "bench_train exit code: $?" | tee -a "$OUT/train.log"
fi
