#!/usr/bin/env bash
# The GPU measurements behind bench/RESULTS.md, on one H100/H200 with the swallow-7b shape (random init, no download).
#   bash bench/gpu.sh OUT_DIR   (done within TOTAL_S=480 s; writes versions.txt, random.json/.log, skewed.json/.log
#                                and profiles.tgz: a torch.profiler table of 2 extra steps per recipe)
# Recipe lists: RECIPES_SKEWED, RECIPES_RANDOM; stop starting recipes after BUDGET_SKEWED / BUDGET_RANDOM seconds;
# SHAPE=tiny runs the same script on CPU as a check of the script itself (numbers mean nothing there).
# Packages the bench imports and the device image lacks come from local wheels in WHEEL_DIR (default .whl; see
# bench/README.md), installed into SITE_DIR (default /tmp/site) only when an import fails.
set -uo pipefail
out=${1:-bench/out}
mkdir -p "$out"
started=$(date +%s)  # TOTAL_S counts from here, the wheel install included
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The targets of bench/RESULTS.md are an 80 GB H100's: plan the "auto" recipes for one on a bigger card too (an H200
# would otherwise get micro-batch 8). Each report's plan_gpu_gib says what its recipes were planned for.
export PLAN_GPU_GIB=${PLAN_GPU_GIB:-79.6}
# What the bench imports (liger_kernel only on a GPU shape: `default` uses it there when installed).
case ${SHAPE:-swallow-7b} in tiny*) liger= ;; *) liger=,liger_kernel ;; esac
imports=${BENCH_IMPORTS:-determined,datasets,deepspeed,peft,transformers$liger}
missing() {  # the names that fail to import, on fd 3; what the imports print goes to stderr
  python3 - "$imports" 3>&1 1>&2 <<'PY'
import importlib, os, sys
bad = []
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except Exception as e:
        print(f"[gpu.sh] import {name}: {type(e).__name__}: {e}", file=sys.stderr)
        bad.append(name)
os.write(3, " ".join(bad).encode())
PY
}
wheels=${WHEEL_DIR:-.whl}
lacking=$(missing)
if [ -n "$lacking" ] && [ -d "$wheels" ]; then
  site=${SITE_DIR:-/tmp/site}
  echo "[gpu.sh] missing: $lacking; installing the wheels of $wheels into $site" >&2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"  # console scripts of the wheels (ninja, for DeepSpeed's FusedAdam JIT build)
  lacking=$(missing)
fi
if [ -n "$lacking" ]; then
  msg="bench/gpu.sh: cannot import $lacking (python3 is $(python3 -c 'import sys; print(sys.version.split()[0])'))."
  msg+=" Provide them as wheels in ${wheels}/ (pip download --only-binary=:all: --python-version <device's> ...;"
  msg+=" see bench/README.md, 'Running on a device machine') carried with the run, or install them before this script."
  echo "$msg" > "$out/error.txt"
  echo "$msg" >&2
  exit 3
fi
# One deadline for everything (TOTAL_S after the start, default 480 s): no recipe starts that would not end before it,
# and one running in its own process is killed at it, so the JSON and logs always come back.
deadline=$(( started + ${TOTAL_S:-480} ))
# Profile tables outside $OUT (only a few files come back from a device run), packed into profiles.tgz after each call.
profiles=$(mktemp -d)
pack_profiles() { tar -C "$profiles" -czf "$out/profiles.tgz" . ; }
common=(--shape "${SHAPE:-swallow-7b}" --steps 16 --warmup 4 --profile-steps "${PROFILE_STEPS:-2}" --profile-dir "$profiles"
        --model-dir "${MODEL_DIR:-/tmp/bench-swallow-7b}" --deadline "$deadline")
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'PY'
import importlib.metadata as m, os, sys
print("python", sys.version.split()[0], "PLAN_GPU_GIB", os.environ.get("PLAN_GPU_GIB"))
for p in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "determined", "liger-kernel",
          "triton"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "missing")
PY
} 2>&1 | tee "$out/versions.txt"
# Full rows of random tokens first: the research baseline's conditions, where the open targets of bench/RESULTS.md
# are (11x seed, 55% of the matmul ceiling). Most important first; the budget skips the tail.
python3 bench/throughput.py "${common[@]}" --data random --budget-s "${BUDGET_RANDOM:-220}" --json "$out/random.json" \
  --recipes "${RECIPES_RANDOM:-seed,default,default+nofusedlora,default+compile,default+mb2,default+hostreads}" 2>&1 | tee "$out/random.log"
pack_profiles
# Length-skewed instruction data: the same questions where packing matters, then Liger's share of the gain, what
# skipping peft's input casts and the host's per-micro-step reads gained, padding and the allocator on changing shapes.
python3 bench/throughput.py "${common[@]}" --data skewed --budget-s "${BUDGET_SKEWED:-180}" --json "$out/skewed.json" \
  --recipes "${RECIPES_SKEWED:-seed,default,default+nofusedlora,padded,default+compile,default+noliger,default+peftcasts,default+hostreads,default+mb2,default+expseg}" \
  2>&1 | tee "$out/skewed.log"
pack_profiles
