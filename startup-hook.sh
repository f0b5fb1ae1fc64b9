#!/usr/bin/env bash
# Determined runs this in every trial and notebook container before the entrypoint.
# The image brings torch (a CUDA build matching its driver) and determined (the cluster's version); this adds the
# rest, pinned, deepspeed included: 0.19.8 fixes ZeRO-3 with activation checkpointing on a frozen (LoRA) base.
set -euo pipefail
python3 scripts/check_image.py  # Python and torch new enough for the pins below, or one line saying what to change
python3 -m pip install --no-cache-dir --quiet -r requirements.txt
