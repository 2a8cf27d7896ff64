#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# All of QEMU's block layer on libhbitmap: QEMU's whole qcow2 `auto` iotests group, plus the
# block-job, NBD and bitmap tests outside it, run with the QEMU built against libhbitmap
# (build-qemu.sh), and compared with the same binaries running QEMU's own util/hbitmap.c
# (build-own-hbitmap.sh, swapped in through LD_LIBRARY_PATH): no test that passes on QEMU's
# own hbitmap.c may fail on libhbitmap, and QEMU's dirty-bitmap tests must all pass.
#
#   block-layer.sh [--both] QEMU_SOURCE_DIR OWN_HBITMAP_DIR OUTDIR
#
# Every test runs on libhbitmap; one that fails runs again alone (up to three times), then
# alone on QEMU's own hbitmap.c: passing there makes it a regression (exit 1), failing there
# too puts it in the list of tests that fail on both (the build's device set or the machine,
# not the bitmap).
# --both runs every test on QEMU's own hbitmap.c too, for the README's full comparison
# (OUTDIR/block-layer.md). OUTDIR/summary.txt gets the summary either way.
set -euo pipefail
both=0
if [[ ${1:-} == --both ]]; then both=1; shift; fi
[[ $# == 3 ]] || { echo "usage: block-layer.sh [--both] QEMU_SOURCE_DIR OWN_HBITMAP_DIR OUTDIR" >&2; exit 2; }
src=$(realpath "$1"); own=$(realpath "$2"); mkdir -p "$3"; out=$(realpath "$3")
iotests=$src/build/tests/qemu-iotests
[[ -x $iotests/check && -f $own/libhbitmap.so.1 ]] \
  || { echo "block-layer.sh: no QEMU build under $src or no $own/libhbitmap.so.1" >&2; exit 1; }

# QEMU's tests of dirty bitmaps: each must pass on libhbitmap.
bitmap_tests=(124 165 176 190 194 196 223 236 242 246 254 256 257 260 271 281 299 300 303 304
  migrate-bitmaps-test migrate-bitmaps-postcopy-test remove-bitmap-from-backing image-fleecing
  backup-discard-source qemu-img-bitmaps nbd-qemu-allocation qemu-img-close-errors)
# Outside the auto group, the tests that run a block job (stream, commit, mirror, backup,
# copy-before-write), export over NBD or change dirty bitmaps: every test of QEMU 10.0.2's
# tests/qemu-iotests whose text names one of those QMP commands or qemu-nbd.
job_tests=(030 055 056 058 094 095 109 118 124 129 132 139 144 147 151 152 155 162 165 173 182
  185 194 200 205 208 218 219 223 224 235 236 240 241 242 245 246 247 248 254 255 257 258 260
  264 274 280 281 295 296 298 300 304 307 312 backup-discard-source export-incoming-iothread
  graph-changes-while-io image-fleecing inactive-node-nbd iothreads-nbd-export
  migrate-bitmaps-postcopy-test migrate-bitmaps-test migrate-during-backup
  mirror-change-copy-mode mirror-ready-cancel-error mirror-top-perms nbd-tls-iothread
  qsd-migrate remove-bitmap-from-backing stream-error-on-reset stream-unaligned-prefetch
  stream-under-throttle)

cd "$iotests"
# (7.2 lists the tests of tests/ with that prefix, which it refuses as a name.)
mapfile -t tests < <({ ./check -n -qcow2 -g auto 2>/dev/null | sed "s|^tests/||"; printf '%s\n' "${bitmap_tests[@]}" "${job_tests[@]}"; } \
  | sort -u | while read -r t; do [[ -e ../../../tests/qemu-iotests/$t || -e ../../../tests/qemu-iotests/tests/$t ]] && echo "$t"; done)
echo "${#tests[@]} iotests: the qcow2 auto group, ${#job_tests[@]} block-job/NBD/bitmap tests outside or in it"

# run LOG [LD_LIBRARY_PATH] TEST...: QEMU's check, -qcow2; the log keeps its report.
run() {
  local log=$1 libpath=$2; shift 2
  if [[ -n $libpath ]]; then
    LD_LIBRARY_PATH=$libpath ./check -qcow2 "$@" >"$log" 2>&1 || true
  else
    ./check -qcow2 "$@" >"$log" 2>&1 || true
  fi
}
# status LOG: "TEST pass|fail|skip" for every test the log reports (a test run alone rewrites
# its "started" line after a carriage return).
status() {
  tr '\r' '\n' <"$1" \
    | awk '$2 == "pass" || $2 == "fail" {print $1, $2} $2 == "not" && $3 == "run" {print $1, "skip"}'
}
outcome() { awk -v t="$1" '$1 == t {s = $2} END {print s ? s : "none"}' "$2"; }

start=$SECONDS
run "$out/lib.log" "" -j 2 "${tests[@]}"
status "$out/lib.log" >"$out/lib.status"
grep -E '^(Passed|Failures|Not run|Failed)' "$out/lib.log" || true
echo "on libhbitmap in $((SECONDS - start)) s"
mapfile -t failed < <(awk '$2 == "fail" {print $1}' "$out/lib.status")
for t in "${tests[@]}"; do
  [[ $(outcome "$t" "$out/lib.status") != none ]] || { echo "block-layer.sh: $t did not run (see $out/lib.log)" >&2; exit 1; }
done

is_bitmap_test() { [[ " ${bitmap_tests[*]} " == *" $1 "* ]]; }
# alone LOG [LD_LIBRARY_PATH] TEST: runs TEST by itself; whether it passed.
alone() {
  run "$1" "$2" "$3"
  [[ $(outcome "$3" <(status "$1")) == pass ]]
}

# Some tests time things (postcopy downtime, throttled jobs, TLS handshakes) or race with
# their own processes (185 can see a job's READY event before the reply to the command that
# started it), and fail on a loaded machine: each failure runs again alone, up to three times,
# and only a test that never passes is compared with QEMU's own hbitmap.c.
regressions=() fail_both=() flaky=()
for t in "${failed[@]}"; do
  if alone "$out/lib-$t.log" "" "$t" || alone "$out/lib-$t-2.log" "" "$t" \
     || alone "$out/lib-$t-3.log" "" "$t"; then
    flaky+=("$t"); continue
  fi
  if alone "$out/own-$t.log" "$own" "$t"; then
    regressions+=("$t")
  else
    fail_both+=("$t")
  fi
done
bitmap_failed=()
for t in "${regressions[@]}" "${fail_both[@]}"; do
  if is_bitmap_test "$t"; then bitmap_failed+=("$t"); fi
done

passed=$(awk '$2 == "pass"' "$out/lib.status" | wc -l)
skipped=$(awk '$2 == "skip" {printf "%s ", $1}' "$out/lib.status")
{
  echo "QEMU's block-layer iotests on libhbitmap: ${#tests[@]} tests, $((passed + ${#flaky[@]})) passed${flaky:+ (${flaky[*]} when run again alone)}, ${#fail_both[@]} fail on QEMU's own hbitmap.c too${fail_both:+ (${fail_both[*]})}, not run here: ${skipped:-none}"
  echo "tests that pass on QEMU's own hbitmap.c and fail on libhbitmap: ${regressions[*]:-none}"
} | tee "$out/summary.txt"

if ((both)); then
  start=$SECONDS
  run "$out/own.log" "$own" -j 2 "${tests[@]}"
  status "$out/own.log" >"$out/own.status"
  echo "on QEMU's own hbitmap.c in $((SECONDS - start)) s"
  {
    echo "| test | QEMU's hbitmap.c | libhbitmap |"
    echo "| --- | --- | --- |"
    for t in "${tests[@]}"; do
      echo "| $t | $(outcome "$t" "$out/own.status") | $(outcome "$t" "$out/lib.status") |"
    done
  } >"$out/block-layer.md"
  differ=$(join <(sort "$out/own.status") <(sort "$out/lib.status") | awk '$2 != $3 {printf "%s (own %s, lib %s) ", $1, $2, $3}')
  echo "full comparison in $out/block-layer.md; outcomes that differ in the parallel runs: ${differ:-none}" | tee -a "$out/summary.txt"
fi

((${#regressions[@]} == 0)) || { echo "block-layer.sh: regressions on libhbitmap: ${regressions[*]}" >&2; exit 1; }
((${#bitmap_failed[@]} == 0)) || { echo "block-layer.sh: QEMU's dirty-bitmap tests failed: ${bitmap_failed[*]}" >&2; exit 1; }
