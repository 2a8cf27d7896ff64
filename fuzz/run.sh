#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Usage: fuzz/run.sh TARGET|all SECONDS [extra libFuzzer flags...]
# Builds each target with cargo-fuzz (stable toolchain via RUSTC_BOOTSTRAP=1) and runs it for
# SECONDS on fuzz/corpus/TARGET (seeded from fuzz/regressions/TARGET and, for the qcow2
# targets, ./make-corpus.sh), then prints executions and coverage from the final stats line.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: run.sh TARGET|all SECONDS}
seconds=${2:?usage: run.sh TARGET|all SECONDS}
shift 2
export RUSTC_BOOTSTRAP=1
all=(qcow2_open qcow2_mutate hbitmap_ops deserialize_part)
if [ "$target" = all ]; then targets=("${all[@]}"); else targets=("$target"); fi

max_len() {
    case $1 in
        qcow2_open) echo 262144 ;;
        qcow2_mutate) echo 512 ;;
        hbitmap_ops) echo 4096 ;;
        deserialize_part) echo 8192 ;;
    esac
}

if [ ! -d corpus/qcow2_open ]; then ./make-corpus.sh; fi
mkdir -p logs
for t in "${targets[@]}"; do
    cargo fuzz build -O "$t" >/dev/null 2>&1 || cargo fuzz build -O "$t"
done
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "regressions/$t" ] && seeds+=("regressions/$t")
    log="logs/$t.log"
    echo "== $t: ${seconds}s (log: fuzz/$log)"
    set +e
    cargo fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
        -max_len="$(max_len "$t")" -print_final_stats=1 "$@" >"$log" 2>&1
    rc=$?
    set -e
    stats=$(grep -E '^#[0-9]+' "$log" | tail -1)
    echo "   last: $stats"
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed 's/^/   /'
    if [ $rc -ne 0 ]; then
        echo "   FAILED (exit $rc):"
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' -A2 "$log" | head -20 | sed 's/^/   /'
    fi
done
