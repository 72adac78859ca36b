#!/usr/bin/env bash
# The baselines quoted in BENCHMARKS.md. GPU part: run on the lent GPU (torch/triton/transformers from its
# image); CPU part: accuracy of the real model (runs anywhere, a few minutes on 2 cores).
#   bash benchmarks/baseline.sh gpu-decode     # Llama-3-8B shape, random bf16 weights
#   bash benchmarks/baseline.sh cpu-accuracy   # smollm2-135m dense perplexity + passkey
#   bash benchmarks/baseline.sh gpu-engine-check|gpu-engine-speed|gpu-engine-e2e|gpu-engine-kernel   # the decode engine
#   bash benchmarks/baseline.sh gpu-methods-check|gpu-methods-speed   # AnTKV, wave, CHESS in the captured step
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-benchmarks/results}
KVPASS=${KVPASS:-kvpass}
case "${1:?usage: baseline.sh gpu-decode|gpu-static|gpu-engine-check|gpu-engine-speed|gpu-engine-e2e|gpu-engine-kernel|gpu-methods-check|gpu-methods-speed|cpu-accuracy}" in
  gpu-decode)
    $KVPASS bench decode --model random:llama:8b --dtype bfloat16 --batch 1 --context 4096 32768 131072 \
      --steps 20 --paths kvpass hf-eager --prefill-max 4096 --out "$OUT"
    $KVPASS bench decode --model random:llama:8b --dtype bfloat16 --batch 8 --context 32768 \
      --steps 20 --paths kvpass hf-eager --prefill-max 0 --out "$OUT"
    $KVPASS bench decode --model random:llama:8b --dtype bfloat16 --batch 1 --context 4096 32768 131072 \
      --steps 20 --paths kvpass --cudagraphs --prefill-max 0 --out "$OUT" ;;
  gpu-static)
    $KVPASS bench decode --model random:llama:8b --dtype bfloat16 --batch 1 --context 4096 32768 131072 \
      --steps 20 --paths hf-static --cudagraphs --out "$OUT"
    $KVPASS bench decode --model random:llama:8b --dtype bfloat16 --batch 8 --context 32768 \
      --steps 20 --paths hf-static --cudagraphs --out "$OUT" ;;
  gpu-engine-check)
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py ;;
  gpu-engine-speed)
    python benchmarks/decode_engine.py --part speed --out "$OUT" ;;
  gpu-engine-e2e)
    python benchmarks/decode_engine.py --part e2e --out "$OUT" ;;
  gpu-engine-kernel)   # where the step's GPU time goes (kernel tables), and the decode attention launch against SDPA
    python benchmarks/probes/decode_attention_tuning.py --part profile --points 1x4096,8x32768
    python benchmarks/probes/decode_attention_tuning.py --part sweep --points 1x4096,8x32768 ;;
  gpu-methods-check)   # recorded = eager steps for each method, the Triton kernels against their references
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "antkv or wave or chess"
    python -m pytest -q -p no:cacheprovider tests/test_coded_attention.py tests/test_anchor_scores.py
    python benchmarks/antkv_kernels.py --contexts 32768 131072 --bits 1 2 --out "$OUT" ;;
  gpu-methods-speed)   # each against the fp16 peer in the same process, steps interleaved
    python benchmarks/decode_engine.py --part speed --antkv 1 --points 1x32768,1x131072 --out "$OUT"
    python benchmarks/decode_engine.py --part speed --wave --points 1x32768,1x131072 --out "$OUT"
    python benchmarks/decode_engine.py --part speed --chess 0.5 --points 1x4096,1x32768 --out "$OUT" ;;
  cpu-accuracy)
    $KVPASS eval ppl --model smollm2-135m --text enwiki --seqlen 1024 --max-windows 8 --out "$OUT"
    $KVPASS eval ppl --model smollm2-135m --text enwiki --seqlen 1024 --max-windows 2 --decode-tail 128 --out "$OUT"
    $KVPASS eval passkey --model smollm2-135m --task passkey --lengths 512 1024 2048 --depths 0.1 0.5 0.9 \
      --trials 3 --out "$OUT"
    $KVPASS eval passkey --model smollm2-135m --task needle --lengths 1024 2048 --depths 0.1 0.5 0.9 \
      --trials 3 --out "$OUT" ;;
  *) echo "unknown part $1" >&2; exit 2 ;;
esac
