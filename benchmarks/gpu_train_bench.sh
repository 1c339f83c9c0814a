#!/usr/bin/env bash
# The CUDA training benchmark on a machine that cannot reach PyPI or the Hub (docs/train-benchmark-cuda*.md).
# FILES: a folder with SmolLM2-135M-Instruct's config.json, generation_config.json, tokenizer files and chat
# template (copy them from ~/.cache/huggingface/salora-merge/models/smollm2-135m-instruct/, without the
# weights). The weights are random (seeded): step time and memory do not depend on their values.
# Needs python3 with torch (CUDA), transformers, peft, safetensors, click, huggingface_hub, tqdm, pyyaml.
set -euo pipefail
FILES=${1:?usage: benchmarks/gpu_train_bench.sh FILES_DIR [OUT_DIR]}
OUT_DIR=${2:-docs}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/sm2 && cp "$FILES"/* /tmp/sm2/
python3 -c "
import torch
from transformers import AutoConfig, AutoModelForCausalLM
c = AutoConfig.from_pretrained('/tmp/sm2'); torch.manual_seed(0)
AutoModelForCausalLM.from_config(c).save_pretrained('/tmp/sm2')"
python3 benchmarks/bench_train.py --device cuda --base /tmp/sm2 --batch 16 --length 512 --steps 20 --repeats 3 \
    --work /tmp/bt --output "$OUT_DIR/train-benchmark-cuda.md"
python3 benchmarks/bench_train.py --device cuda --base /tmp/sm2 --batch 16 --length 512 --steps 20 --repeats 3 \
    --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --work /tmp/bt7 \
    --output "$OUT_DIR/train-benchmark-cuda-all7.md"
