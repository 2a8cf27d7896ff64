#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
# Generates the seed corpora (git-ignored) under fuzz/corpus/.
set -eu
cd "$(dirname "$0")"
cargo run --quiet --release --example make_corpus -- corpus
ls -l corpus/qcow2_open | awk '{s+=$5} END {print NR-1 " images, " s " bytes"}'
