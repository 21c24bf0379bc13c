#!/usr/bin/env bash
# The GPU checks and measurements of the fused paths, in the order they are needed, each under
# its own time limit, in parts that each fit one 10-minute command:
#
#   bash benchmarks/gpu_check.sh 1 [OUT_DIR]   # bf16 GPU tests, tile sweeps, inference, eager and graphed steps (<= 9.7 min)
#   bash benchmarks/gpu_check.sh 2 [OUT_DIR]   # one run: eager floor, lorakit, PEFT, full; compiled floor, lorakit (<= 9.7 min)
#   bash benchmarks/gpu_check.sh 3 [OUT_DIR]   # bf16 GPU tests, eager and graphed steps at two shapes and ranks, an eager profile (<= 8.2 min)
#   bash benchmarks/gpu_check.sh 4 [OUT_DIR]   # inference with PEFT alongside, host cost per call, an eager profile (<= 8 min)
#   bash benchmarks/gpu_check.sh 5 [OUT_DIR]   # compiled lorakit at r = 64 (floor: part 2's), compiled 4 x 2048 (<= 8.7 min)
#   bash benchmarks/gpu_check.sh 6 [OUT_DIR]   # bf16 GPU tests, inference with PEFT alongside (<= 8.4 min)
#   bash benchmarks/gpu_check.sh 7 [OUT_DIR]   # bf16 GPU tests, eager and graphed steps, eager and compiled (4-block) profiles (<= 9.2 min)
#   bash benchmarks/gpu_check.sh 8 [OUT_DIR]   # bf16 GPU tests (with the W + s·B·A kernel tests), inference with PEFT,
#                                              # eager and graphed steps with the cast-first control (<= 9.2 min)
#   bash benchmarks/gpu_check.sh 9 [OUT_DIR]   # bf16 GPU tests, inference with PEFT and graphed_generate, host cost
#                                              # per call with a profile of a LoRA layer's host time (<= 9.4 min)
#   bash benchmarks/gpu_check.sh 10 [OUT_DIR]  # bf16 GPU tests, one graphed decode step captured several ways,
#                                              # eager and graphed steps with the cast-first control (<= 8 min)
#   bash benchmarks/gpu_check.sh 11 [OUT_DIR]  # compiled floor and lorakit, dropout 0 and 0.1 (<= 9.5 min)
#   bash benchmarks/gpu_check.sh 12 [OUT_DIR]  # the graphed_generate GPU test, inference as the issue states it
#                                              # (128 new tokens) with PEFT, and where the eager host time goes (<= 8 min)
#   bash benchmarks/gpu_check.sh 13 [OUT_DIR]  # the mixed-batch GPU tests, eager inference rows only (<= 4 min)
#   bash benchmarks/gpu_check.sh 14 [OUT_DIR]  # bf16 GPU tests, eager and graphed steps with the three-node MLP
#                                              # control, and eager steps of an earlier tree (<= 9.2 min)
#   bash benchmarks/gpu_check.sh 15 [OUT_DIR]  # host cost per call, a direct-launch experiment and eager inference
#                                              # rows, this tree and an earlier one (<= 9 min)
#   bash benchmarks/gpu_check.sh 16 [OUT_DIR]  # bf16 GPU tests, the dropout kernels and the gated backward (micro),
#                                              # eager and graphed steps, this tree and an earlier one (<= 9.3 min)
#   bash benchmarks/gpu_check.sh 17 [OUT_DIR]  # the dropout kernels and the gated backward (micro), host cost per
#                                              # call, the direct-launch experiment, this tree and an earlier one (<= 7 min)
#   bash benchmarks/gpu_check.sh 18 [OUT_DIR]  # bf16 GPU tests, eager and graphed steps at two shapes and two
#                                              # ranks (<= 7.5 min)
#   bash benchmarks/gpu_check.sh 19 [OUT_DIR]  # the GPU mask test, eager and graphed steps at r = 64 and 16 with
#                                              # the rank-64 tiles, eager inference rows, a compiled (4-block)
#                                              # profile at dropout 0 and 0.1 (<= 8.7 min)
#   bash benchmarks/gpu_check.sh 20 [OUT_DIR]  # the fused and gated GPU tests, the gated MLP's kernels (micro),
#                                              # eager and graphed steps at dropout 0.1, r = 16 and 64, this
#                                              # tree and an earlier one (<= 8.8 min)
#   bash benchmarks/gpu_check.sh 21 [OUT_DIR]  # bf16 GPU tests but the compiled ones, the shared-input kernels
#                                              # natively, the compiled test of the one-node MLP, the shared
#                                              # shrinks and dropout backward (micro), eager and graphed steps
#                                              # with the q/k/v node and without (<= 9.4 min)
#   bash benchmarks/gpu_check.sh 22 [OUT_DIR]  # the compiled GPU tests (<= 5 min)
#   bash benchmarks/gpu_check.sh 23 [OUT_DIR]  # the GPU tests of the shared passes, of wide ranks and of the
#                                              # compiled one-node MLP (<= 4 min)
#   bash benchmarks/gpu_check.sh 24 [OUT_DIR]  # what the compiled step keeps for backward (2 blocks; the norms
#                                              # recomputed and kept), the compiled GPU tests (<= 9.4 min)
#   bash benchmarks/gpu_check.sh 25 [OUT_DIR]  # compiled 4 x 2048 at r = 64, p = 0.1 with its floor; compiled
#                                              # (4-block) steps with the norms recomputed, kept, recomputed (<= 7.3 min)
#
# Parts 14 to 17 and 20 compare with an earlier tree where .carry/before/ holds one (its src/ and
# benchmarks/, e.g. `git archive d94617a src benchmarks | tar -x -C .carry/before`), run in
# processes of their own on the same machine.
#
# Logs and JSON rows go to OUT_DIR (default: $OUT, else gpu-check/); each step's table is
# printed as it finishes.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-1}"
out="${2:-${OUT:-gpu-check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to OUT/NAME.txt, print its tail
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "--- exit $?"
    tail -n 25 "$out/$name.txt"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "$part" = 1 ]; then
    step gpu-tests 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step micro-gated 100 python micro_lora_ops.py --gated
    step micro-masked 150 python micro_lora_ops.py --masked
    step infer 100 python infer.py --skip-peft --reps 10 --decode-steps 64 --json "$out/infer.json"
    step train-eager-graphed 80 python train_step.py --modes eager,graphed --methods floor,lorakit --dropouts 0,0.1 \
        --json "$out/train-eager-graphed.json"
elif [ "$part" = 2 ]; then
    cd benchmarks
    step train-eager-compiled 580 python train_step.py --modes eager,compiled --methods floor,lorakit,peft,full \
        --compiled-methods floor,lorakit --dropouts 0,0.1 --json "$out/train-eager-compiled.json"
elif [ "$part" = 3 ]; then
    step gpu-tests 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step train-shapes 220 python train_step.py --modes eager,graphed --methods floor,lorakit --dropouts 0,0.1 \
        --shapes 16x512,4x2048 --ranks 16,64 --json "$out/train-shapes.json"
    step profile-eager 120 python profile_step.py --runs floor,lorakit:0,lorakit:0.1 --rows 20 \
        --out "$out/profile"
elif [ "$part" = 4 ]; then
    cd benchmarks
    step infer 300 python infer.py --reps 10 --decode-steps 64 --peft-decode-steps 16 --json "$out/infer.json"
    step host-cost 60 python host_cost.py
    step profile-eager 120 python profile_step.py --runs floor,lorakit:0,lorakit:0.1 --rows 20 \
        --out "$out/profile"
elif [ "$part" = 5 ]; then
    cd benchmarks
    step train-compiled-r64 200 python train_step.py --modes compiled --methods lorakit --ranks 64 --dropouts 0,0.1 \
        --json "$out/train-compiled-r64.json"
    step train-compiled-4x2048 320 python train_step.py --modes compiled --methods floor,lorakit --shapes 4x2048 \
        --dropouts 0,0.1 --json "$out/train-compiled-4x2048.json"
elif [ "$part" = 6 ]; then
    step gpu-tests 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step infer 300 python infer.py --reps 10 --decode-steps 64 --peft-decode-steps 16 --json "$out/infer.json"
elif [ "$part" = 7 ]; then
    step gpu-tests 180 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step train-eager-graphed 90 python train_step.py --modes eager,graphed --methods floor,lorakit --dropouts 0,0.1 \
        --json "$out/train-eager-graphed.json"
    step profile-eager 120 python profile_step.py --runs floor,lorakit:0,lorakit:0.1 --rows 20 --out "$out/profile"
    step profile-compiled 150 python profile_step.py --runs floor:0:compiled,lorakit:0:compiled,lorakit:0.1:compiled \
        --layers 4 --rows 30 --out "$out/profile-compiled"
elif [ "$part" = 8 ]; then
    step gpu-tests 170 bash -c "python -m pytest -q -p no:cacheprovider tests/test_gpu.py; \
        python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k 'w_eff or half_forward'"
    cd benchmarks
    step infer 260 python infer.py --reps 10 --decode-steps 64 --peft-decode-steps 16 --json "$out/infer.json"
    step train-eager-graphed 115 python train_step.py --modes eager,graphed --methods floor,lorakit,lorakit-cast-first \
        --dropouts 0,0.1 --json "$out/train-eager-graphed.json"
elif [ "$part" = 9 ]; then
    step gpu-tests 200 bash -c "python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k half_forward; \
        python -m pytest -q -p no:cacheprovider tests/test_gpu.py"
    cd benchmarks
    step infer 300 python infer.py --reps 10 --decode-steps 64 --peft-decode-steps 16 --json "$out/infer.json"
    step host-cost 60 python host_cost.py --profile
elif [ "$part" = 10 ]; then
    step gpu-tests 200 bash -c "python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
        -k 'half_forward or round'; python -m pytest -q -p no:cacheprovider tests/test_gpu.py"
    cd benchmarks
    step decode-check 120 python decode_check.py
    step train-eager-graphed 150 python train_step.py --modes eager,graphed --methods floor,lorakit,lorakit-cast-first \
        --dropouts 0,0.1 --json "$out/train-eager-graphed.json"
elif [ "$part" = 11 ]; then
    cd benchmarks
    step train-compiled 570 python train_step.py --modes compiled --methods floor,lorakit --dropouts 0,0.1 \
        --json "$out/train-compiled.json"
elif [ "$part" = 12 ]; then
    step gpu-tests 90 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k graphed_generate
    cd benchmarks
    step infer 380 python infer.py --reps 10 --decode-steps 128 --peft-decode-steps 16 --profile-host \
        --json "$out/infer.json"
elif [ "$part" = 13 ]; then
    step gpu-tests 90 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "mixed or graphed"
    cd benchmarks
    step infer 150 python infer.py --reps 10 --decode-steps 64 --skip-peft --skip-graphs --json "$out/infer.json"
elif [ "$part" = 14 ]; then
    step gpu-tests 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step train-eager-graphed 150 python train_step.py --modes eager,graphed \
        --methods floor,lorakit,lorakit-three-nodes --dropouts 0,0.1 --json "$out/train-eager-graphed.json"
    if [ -d ../.carry/before/src ]; then
        (cd ../.carry/before/benchmarks && export PYTHONPATH="$PWD/../src" \
            && step train-eager-before 150 python train_step.py --modes eager --methods floor,lorakit --dropouts 0,0.1 \
                --json "$out/train-eager-before.json")
    fi
elif [ "$part" = 15 ]; then
    cd benchmarks
    step host-cost 60 python host_cost.py
    step direct-launch 60 python direct_launch.py
    step infer-eager 150 python infer.py --reps 10 --decode-steps 64 --skip-peft --skip-graphs \
        --json "$out/infer-eager.json"
    if [ -d ../.carry/before/src ]; then
        (cd ../.carry/before/benchmarks && export PYTHONPATH="$PWD/../src" \
            && step host-cost-before 60 python host_cost.py \
            && step infer-eager-before 150 python infer.py --reps 10 --decode-steps 64 --skip-peft --skip-graphs \
                --json "$out/infer-eager-before.json")
    fi
elif [ "$part" = 16 ]; then
    step gpu-tests 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step micro-masked 60 python micro_lora_ops.py --masked
    step micro-gated 45 python micro_lora_ops.py --gated
    step train-eager-graphed 120 python train_step.py --modes eager,graphed --methods floor,lorakit --dropouts 0,0.1 \
        --json "$out/train-eager-graphed.json"
    if [ -d ../.carry/before/src ]; then
        (cd ../.carry/before/benchmarks && export PYTHONPATH="$PWD/../src" \
            && step micro-masked-before 60 python micro_lora_ops.py --masked \
            && step micro-gated-before 45 python micro_lora_ops.py --gated \
            && step train-eager-graphed-before 120 python train_step.py --modes eager,graphed --methods floor,lorakit \
                --dropouts 0.1 --json "$out/train-eager-graphed-before.json")
    fi
elif [ "$part" = 17 ]; then
    cd benchmarks
    step micro-masked 90 python micro_lora_ops.py --masked
    step micro-gated 60 python micro_lora_ops.py --gated
    step host-cost 60 python host_cost.py
    step direct-launch 60 python direct_launch.py
    if [ -d ../.carry/before/src ]; then
        (cd ../.carry/before/benchmarks && export PYTHONPATH="$PWD/../src" \
            && step micro-masked-before 90 python micro_lora_ops.py --masked \
            && step micro-gated-before 60 python micro_lora_ops.py --gated)
    fi
elif [ "$part" = 18 ]; then
    step gpu-tests 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    cd benchmarks
    step train-shapes 290 python train_step.py --modes eager,graphed --methods floor,lorakit --dropouts 0,0.1 \
        --shapes 16x512,4x2048 --ranks 16,64 --json "$out/train-shapes.json"
elif [ "$part" = 19 ]; then
    step gpu-tests 100 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "masks_equal or fused_matches"
    cd benchmarks
    step train-r64 120 python train_step.py --modes eager,graphed --methods floor,lorakit --ranks 16,64 \
        --dropouts 0.1 --json "$out/train-r64.json"
    step infer-eager 150 python infer.py --reps 10 --decode-steps 64 --skip-peft --skip-graphs \
        --json "$out/infer-eager.json"
    step profile-compiled 150 python profile_step.py --runs floor:0:compiled,lorakit:0:compiled,lorakit:0.1:compiled \
        --layers 4 --rows 30 --out "$out/profile-compiled"
elif [ "$part" = 20 ]; then
    step gpu-tests 120 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py \
        -k "fused_matches or masks_equal or gated"
    cd benchmarks
    step micro-gated 60 python micro_lora_ops.py --gated
    step train-p01 120 python train_step.py --modes eager,graphed --methods floor,lorakit --ranks 16,64 \
        --dropouts 0.1 --json "$out/train-p01.json"
    if [ -d ../.carry/before/src ]; then
        (cd ../.carry/before/benchmarks && export PYTHONPATH="$PWD/../src" \
            && step train-p01-before 120 python train_step.py --modes eager,graphed --methods floor,lorakit \
                --ranks 16,64 --dropouts 0.1 --json "$out/train-p01-before.json")
    fi
elif [ "$part" = 21 ]; then
    step gpu-tests 200 bash -c "python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k 'not compiled'; \
        python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k 'siblings or shared_input or whole_gated'"
    step gpu-tests-compiled-one-node 120 python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        -k "compiled_matches_eager and node"
    cd benchmarks
    step micro-siblings 60 python micro_lora_ops.py --siblings
    step train-eager-graphed 180 python train_step.py --modes eager,graphed --methods floor,lorakit,lorakit-qkv-alone \
        --dropouts 0,0.1 --json "$out/train-eager-graphed.json"
elif [ "$part" = 22 ]; then
    step gpu-tests-compiled 300 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k compiled
elif [ "$part" = 23 ]; then
    step gpu-tests 240 bash -c "python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        -k 'wide_ranks or shared_input or (compiled_matches_eager and node)'; \
        python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k 'siblings or shared_input or whole_gated'"
elif [ "$part" = 24 ]; then
    step gpu-tests-compiled 320 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k compiled
    cd benchmarks
    step compiled-saved 240 python compiled_saved.py --runs floor,lorakit:0,lorakit:0.1,lorakit:0:norms=0
elif [ "$part" = 25 ]; then
    cd benchmarks
    step train-compiled-4x2048-r64 210 python train_step.py --modes compiled --methods floor,lorakit --shapes 4x2048 \
        --ranks 64 --dropouts 0.1 --json "$out/train-compiled-4x2048-r64.json"
    for run in recomputed:1 kept:0 recomputed-again:1; do  # the same code twice gives the noise
        LORAKIT_RECOMPUTE_NORMS="${run#*:}" step "train-compiled-4-norms-${run%:*}" 75 python train_step.py \
            --modes compiled --methods lorakit --dropouts 0 --layers 4 --steps 30 --json "$out/norms-${run%:*}.json"
    done
else
    echo "usage: bash benchmarks/gpu_check.sh 1|...|25 [OUT_DIR]" >&2
    exit 2
fi
