#!/usr/bin/env bash
# Determined runs this in every trial and notebook container before the entrypoint.
# The image brings Python and torch (a CUDA build matching its driver), and Determined has already installed its own
# client (the master's version) for python3, the interpreter the entrypoints run; this adds the rest, pinned,
# deepspeed included: 0.19.8 fixes ZeRO-3 with activation checkpointing on a frozen (LoRA) base.
# Determined *sources* this file into its own entrypoint shell, so it sets no shell options: a `set -u` left behind
# makes the entrypoint's signal handling fail on an unset variable, and every finished trial then exits 1.
python3 scripts/check_image.py || exit 1  # Python and torch new enough for the pins, or one line saying what to change
python3 -m pip install --no-cache-dir --quiet -r requirements.txt || exit 1
