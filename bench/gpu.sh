#!/usr/bin/env bash
# The GPU measurements behind bench/RESULTS.md, on one H100/H200 with the swallow-7b shape (random init, no download).
#   bash bench/gpu.sh OUT_DIR   (about 9 minutes; writes versions.txt, skewed.json/.log, random.json/.log and
#                                profiles.tgz: a torch.profiler table of 2 extra steps per recipe)
# Recipe lists: RECIPES_SKEWED, RECIPES_RANDOM; stop starting recipes after BUDGET_SKEWED / BUDGET_RANDOM seconds;
# SHAPE=tiny runs the same script on CPU as a check of the script itself (numbers mean nothing there).
set -uo pipefail
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
common=(--shape "${SHAPE:-swallow-7b}" --steps 8 --warmup 4 --profile-steps "${PROFILE_STEPS:-2}" --profile-dir "$out/profiles"
        --model-dir "${MODEL_DIR:-/tmp/bench-swallow-7b}")
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import importlib.metadata as m, sys; print("python", sys.version.split()[0]); print(*(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "determined", "liger-kernel", "triton")), sep="\n")'
} 2>&1 | tee "$out/versions.txt"
# Length-skewed instruction data: the reference's settings, this project's default, and the open questions of
# bench/RESULTS.md, most important first (the budget skips the tail): regional torch.compile against the host's
# per-step cost, a larger micro-batch, Liger's share of the gain, padding, the allocator on changing shapes.
python3 bench/throughput.py "${common[@]}" --data skewed --budget-s "${BUDGET_SKEWED:-280}" --json "$out/skewed.json" \
  --recipes "${RECIPES_SKEWED:-seed,default,default+compile,default+mb2,default+noliger,padded,default+expseg}" \
  2>&1 | tee "$out/skewed.log"
# Full rows of random tokens: the research baseline's conditions.
python3 bench/throughput.py "${common[@]}" --data random --budget-s "${BUDGET_RANDOM:-120}" --json "$out/random.json" \
  --recipes "${RECIPES_RANDOM:-seed,default,default+compile,default+mb2}" 2>&1 | tee "$out/random.log"
tar -C "$out" -czf "$out/profiles.tgz" profiles && rm -r "$out/profiles"
