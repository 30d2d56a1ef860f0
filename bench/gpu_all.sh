#!/usr/bin/env bash
# One device call that builds, checks and measures everything of issue #5 on a CUDA machine; results under $OUT
# (default bench/results/gpu-<date>), a short table printed last. Usage (repository root, on the GPU machine):
#   OUT=/some/dir bash bench/gpu_all.sh
# Budget: ~10 min on an H100 with the default pairs (7B and 13B bases); IVL_BENCH_PAIRS / IVL_BENCH_NEW narrow it.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
PY=${PY:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-16}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"
} > "$OUT/env.txt" 2>&1
# 1. the CUDA build of the extension (graph runner) and its build info
$PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1  # the image has the deps; nothing can be fetched there
$PY -c "import ivl_fast, json; print(json.dumps(ivl_fast.build_info()))" > "$OUT/build_info.json" 2>> "$OUT/build.log"
# 2. correctness on the device: graph path vs eager (python and C++ runners, all layouts), kernels vs references
#    (test_row_seeds / test_logit_terms run the compiled kernel's per-row seeds and logit terms against the torch path)
$PY -m pytest -q -x tests/test_graphs.py tests/test_combine_and_sample.py tests/test_fused_ce_l1.py \
  tests/test_decoder.py tests/test_row_seeds.py tests/test_logit_terms.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
# 3. decode measurements: base alone vs pair (fused / two streams / one stream / eager) vs naive HF
IVL_BENCH_PAIRS=${IVL_BENCH_PAIRS:-"tinyllama-1.1b+llama-2-7b,tinyllama-1.1b+llama-2-13b"} \
IVL_BENCH_SUMMARY="$OUT/decode_summary.json" \
  $PY -m pytest -q bench/test_decode.py -p no:cacheprovider --benchmark-json="$OUT/decode_benchmark.json" \
  > "$OUT/decode.log" 2>&1
echo "decode rc=$?" >> "$OUT/decode.log"
# 4. the fused sampler and the fused loss against their baselines
IVL_BENCH_OUT="$OUT/combine_and_sample.json" $PY -m pytest -q -s bench/test_combine_and_sample.py \
  -p no:cacheprovider > "$OUT/combine_and_sample.log" 2>&1
IVL_BENCH_OUT="$OUT/fused_ce_l1.json" $PY -m pytest -q -s bench/test_fused_ce_l1.py -p no:cacheprovider \
  > "$OUT/fused_ce_l1.log" 2>&1
# 5. speculative rounds (#16): per-step costs, break-even acceptance, draft = base as the all-accepted bound
IVL_BENCH_OUT="$OUT/speculative_gpu.json" $PY -m pytest -q -s bench/test_speculative.py -k gpu -p no:cacheprovider \
  > "$OUT/speculative.log" 2>&1
# 6. the pair on vLLM (#32), where the image has vLLM (nothing can be installed there): its tests on the GPU backend
#    (CUDA graphs, torch.compile of two stacks), then the 64-client comparison with the base alone and ivl-fast serve
if $PY -c "import vllm" 2> /dev/null; then
  $PY -m pytest -q tests/on_vllm -p no:cacheprovider > "$OUT/vllm_tests.log" 2>&1
  echo "vllm tests rc=$?" >> "$OUT/vllm_tests.log"
  IVL_BENCH_OUT="$OUT/vllm_serve_gpu.json" $PY -m pytest -q -s bench/test_vllm_serve.py -p no:cacheprovider \
    > "$OUT/vllm_serve.log" 2>&1
else
  echo "vllm is not installed in this image: the pair on vLLM not measured" > "$OUT/vllm_serve.log"
fi
# the short table, last
tail -n 3 "$OUT/tests.log"
sed -n '/decode summary/,$p' "$OUT/decode.log" | head -n 20
tail -n 5 "$OUT/combine_and_sample.log" "$OUT/fused_ce_l1.log"
tail -n 12 "$OUT/speculative.log"
tail -n 2 "$OUT/vllm_tests.log" "$OUT/vllm_serve.log" 2> /dev/null
