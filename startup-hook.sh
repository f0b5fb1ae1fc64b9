#!/usr/bin/env bash
# Determined runs this in every trial and notebook container before the entrypoint.
# The image (determinedai/genai-train) brings torch, deepspeed and determined; this adds the rest, pinned.
set -euo pipefail
pip install --no-cache-dir --quiet -r requirements.txt
