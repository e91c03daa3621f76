#!/usr/bin/env bash
# Install merge_engine into .venv and run a demo merge end to end: generate tiny Llama checkpoints with
# transformers, TIES-merge them in bf16 with the engine, and load the result with transformers.
source "$(dirname "$0")/setup_env.sh" hf
python -m merge_engine.demo "${1:-demo_out}"
