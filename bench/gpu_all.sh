#!/usr/bin/env bash
# Every GPU-only check of Tandem in one go, for a session that has a CUDA machine for a few minutes:
# the kernel tests at real sizes, the attention and norm/cross-entropy benchmarks, and end-to-end MFU.
# The tests run each kernel at its first autotune config (TANDEM_ATTENTION_AUTOTUNE=0); `configs` checks
# and times every config alone.
# Usage: bash bench/gpu_all.sh [PARTS]   PARTS: comma-separated subset of tests,configs,attention,attention_fwd,
#        attention_dropout,kernels,memory,step_profile,mfu
#        (default: all). Logs go to $LOG_DIR (default bench-logs/); each part has its own time limit so
#        one hang cannot eat the rest. Results belong in docs/benchmarks.md with the date and machine.
set -u
PARTS=",${1:-tests,configs,attention,attention_fwd,attention_dropout,kernels,memory,step_profile,mfu},"
LOG_DIR=${LOG_DIR:-bench-logs}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

part() {  # part NAME SECONDS CMD...: run CMD with a time limit, tee its output into LOG_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    case $PARTS in *",$name,"* | *",$name:"*) ;; *) return 0 ;; esac
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    echo "=== $name exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
part tests "${TESTS_LIMIT:-240}" env TANDEM_ATTENTION_AUTOTUNE=0 $py -m pytest -q -p no:cacheprovider \
    tests/unit/test_kernels_attention.py tests/unit/test_kernels_norms_ce.py
part configs "${CONFIGS_LIMIT:-300}" $py bench/attention_configs.py ${CONFIGS_ARGS:-}
part attention "${ATTN_LIMIT:-360}" $py bench/attention.py ${ATTN_ARGS:-}
part attention_fwd "${ATTN_LIMIT:-360}" $py bench/attention.py --mode fwd --head-dims 128 --seqs 2048,4096,8192,16384
part attention_dropout "${ATTN_LIMIT:-360}" $py bench/attention.py --dropout 0.1 --head-dims 128 --seqs 2048,4096,8192
part kernels 120 $py bench/kernels.py
part memory 120 $py bench/activation_memory.py
part step_profile 300 $py bench/step_profile.py --model-preset gpt-350m --seq-len 2048 --batch 8 --dtype bf16
part mfu "${MFU_LIMIT:-560}" $py bench/mfu.py ${MFU_ARGS:-}
