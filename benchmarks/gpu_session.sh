#!/usr/bin/env bash
# The GPU checks of the rollout engine in one script, for a lent machine with torch, triton and
# transformers installed but not this package (run from the repository root, logs under $OUT).
#
#   phase 1: CUDA tests (rollout, and the compiled Triton log-prob head against fp64), decode
#            step vs bandwidth floor (SmolLM2 shape; LLAMA1B=1 adds the Llama-3.2-1B shape);
#   phase 2: rollout benchmark with the packaged SmolLM2 weights, then with random
#            SmolLM2-shaped weights;
#   phase 3: training, random weights (needs no GGUF): the fused head vs eager / compiled /
#            Liger at N in {4096, 16384}, H 4096, V 128256; DPO steps on the Llama-3.2-1B shape,
#            full and LoRA, packed vs unpacked, with MFU; an 8B-shape LoRA DPO step with
#            activation checkpointing (peak memory).
#
# Files it expects (ignored by git, made by hand; docs/rollout.md says how):
#   .device/whl/gguf-*.whl            the gguf reader (pure Python)
#   .device/whl/liger_kernel-*.whl    phase 3's Liger baseline (pure Python; `pip download
#                                     liger-kernel==0.8.5 --no-deps -d .device/whl`)
#   .device/smol/                     SmolLM2's config.json and tokenizer files
#   .device/gsm8k_test.jsonl          GSM8K test questions
#   .device_a/gguf.part, .device_b/gguf.part
#                                     the GGUF in two halves (the device tool carries at most
#                                     64 MiB per call: phase 1 brings half, phase 2 the rest)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
  TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
[ -e malt_fast/kernels ] || ln -s ../kernels malt_fast/kernels
log=$OUT/session$1.log
run() { echo "### $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log" | grep -v "it/s]\|tok/s]"; }

if [ "$1" = 3 ]; then
  # DRY=1: the same phase on a CPU at toy shapes (SmolLM2's shape for both models, small head)
  if [ -n "${DRY:-}" ]; then
    dev=cpu; m1=smollm2-135m; m8=smollm2-135m; lp="--N 512 --H 256 --V 4099"; t=600
  else
    dev=cuda; m1=llama-3.2-1b; m8=llama-3.1-8b; lp=""; t=150
  fi
  python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'cpu')" | tee -a "$log"
  run timeout $t python3 benchmarks/logprob.py --device $dev $lp --dtype bfloat16 --repeats 3 \
    --json "$OUT/logprob_gpu.json"
  for ft in full lora; do
    run timeout $t python3 benchmarks/train_step.py --device $dev --dtype bfloat16 --model $m1 \
      --finetune $ft --prompts ${PROMPTS:-8} --repeats ${REPEATS:-3} \
      --methods unpacked/eager unpacked/fused tree/fused --json "$OUT/train_step_1b_$ft.json"
  done
  run timeout $t python3 benchmarks/train_step.py --device $dev --dtype bfloat16 --model $m8 \
    --checkpointing --prompts ${PROMPTS:-4} --repeats ${REPEATS:-2} \
    --methods unpacked/fused tree/fused --json "$OUT/train_step_8b_lora.json"
  exit 0
fi

if [ "$1" = 1 ]; then
  mkdir -p /root/gguf && cp .device_a/gguf.part /root/gguf/a
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv | tee -a "$log"
  python3 -c "import torch, triton, transformers as t; print(torch.__version__, \
triton.__version__, t.__version__)" | tee -a "$log"
  run timeout 150 python3 -m pytest -q -p no:cacheprovider tests/rollout/test_cuda.py
  run timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_linear_logprob_cuda.py
  run timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_lora_grouped.py \
    tests/model/test_multi_adapter.py
  run timeout 100 python3 benchmarks/decode_step.py --shape smollm2-135m --batch 64 128 256 \
    --json-out "$OUT/decode_smollm2.json"
  [ -n "${LLAMA1B:-}" ] && run timeout 80 python3 benchmarks/decode_step.py \
    --shape llama-3.2-1b --batch 64 128 256 --json-out "$OUT/decode_llama1b.json"
else
  [ -f /root/gguf/a ] || { echo "phase 2 needs the machine of phase 1 (its first half of the GGUF)"; exit 1; }
  cat /root/gguf/a .device_b/gguf.part > /root/gguf/smollm2.gguf || exit 1
  sha1sum /root/gguf/smollm2.gguf | tee -a "$log"
  run timeout 280 python3 benchmarks/rollout.py --device cuda --model /root/gguf/smollm2.gguf \
    --questions-file .device/gsm8k_test.jsonl --questions 16 --n 3 --max-new-tokens 256 \
    --max-batch 256 --cache-tokens 262144 --hf-batch 32 --hf-dtype bfloat16 --graphs-ablation \
    --json-out "$OUT/rollout_smollm2.json"
  # random SmolLM2-shaped weights: every reply runs to its budget (SKIP=a,b: ours only)
  run timeout 150 python3 benchmarks/rollout.py --device cuda --model .device/smol \
    --random-weights --questions-file .device/gsm8k_test.jsonl --questions 16 --n 3 \
    --max-new-tokens 256 --max-batch 256 --cache-tokens 262144 --hf-batch 32 \
    --hf-dtype bfloat16 --skip "${SKIP:-a,b}" --json-out "$OUT/rollout_random.json"
fi
