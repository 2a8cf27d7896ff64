# SPDX-License-Identifier: GPL-2.0-or-later
# Sourced by the .ci scripts: their steps, timed, and the Debian packages they install.
#
#   step "what"                 starts a step (the previous one ends)
#   install_missing PKG...      apt-get installs those not installed (as root, or with sudo)
#   need TOOL...                fails naming the first tool not on PATH
#
# Each script prints the time of its steps when it exits, passed or failed, so that a slow CI
# run shows where its time went.

ci_script=$(basename "$0")
ci_step_name=""
ci_step_started=$SECONDS
ci_step_times=()

ci_end_step() {
    [ -n "$ci_step_name" ] || return 0
    ci_step_times+=("$(printf '%6ds  %s' $((SECONDS - ci_step_started)) "$ci_step_name")")
    ci_step_name=""
}

step() {
    ci_end_step
    ci_step_name=$*
    ci_step_started=$SECONDS
    printf '\n==> %s\n' "$*"
}

ci_print_times() {
    local status=$?
    ci_end_step
    if ((${#ci_step_times[@]})); then
        printf '\n%s: time per step\n' "$ci_script"
        printf '%s\n' "${ci_step_times[@]}"
        printf '%6ds  total%s\n' "$SECONDS" "$( ((status == 0)) || echo " (failed, exit $status)")"
    fi
    return $status
}
trap ci_print_times EXIT

install_missing() {
    command -v dpkg-query >/dev/null && command -v apt-get >/dev/null || return 0
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    step "installing ${missing[*]}"
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$ci_script: $tool is missing" >&2; exit 1; }
    done
}
