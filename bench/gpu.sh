#!/usr/bin/env bash
# The GPU measurements behind bench/RESULTS.md, on one H100/H200 with the swallow-7b shape (random init, no download).
#   bash bench/gpu.sh OUT_DIR   (done within TOTAL_S=480 s; writes versions.txt, random.json/.log, skewed.json/.log
#                                and profiles.tgz: a torch.profiler table of 2 extra steps per recipe)
# Recipe lists: RECIPES_SKEWED, RECIPES_RANDOM; stop starting recipes after BUDGET_SKEWED / BUDGET_RANDOM seconds;
# SHAPE=tiny runs the same script on CPU as a check of the script itself (numbers mean nothing there).
set -uo pipefail
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One deadline for everything (TOTAL_S after the start, default 480 s): no recipe starts that would not end before it,
# and one running in its own process is killed at it, so the JSON and logs always come back.
deadline=$(( $(date +%s) + ${TOTAL_S:-480} ))
# Profile tables outside $OUT (only a few files come back from a device run), packed into profiles.tgz after each call.
profiles=$(mktemp -d)
pack_profiles() { tar -C "$profiles" -czf "$out/profiles.tgz" . ; }
common=(--shape "${SHAPE:-swallow-7b}" --steps 8 --warmup 4 --profile-steps "${PROFILE_STEPS:-2}" --profile-dir "$profiles"
        --model-dir "${MODEL_DIR:-/tmp/bench-swallow-7b}" --deadline "$deadline")
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import importlib.metadata as m, sys; print("python", sys.version.split()[0]); print(*(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "determined", "liger-kernel", "triton")), sep="\n")'
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
