#!/usr/bin/env bash
# Runs every fuzz target of the RTMP parsers for SECONDS each (default 60).
# cargo-fuzz comes from crates.io; the stable toolchain is used with
# RUSTC_BOOTSTRAP=1 for the sanitizer flags, as no nightly is needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in chunk_reader amf0 message handshake flv; do
    mkdir -p "fuzz/corpus/$target"
    echo "=== $target ($seconds s)"
    cargo fuzz run -O "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 2>&1 | grep -E "^Done|crash|ERROR|SUMMARY" || true
done
if find fuzz/artifacts -type f 2>/dev/null | grep -q .; then
    echo "crashes found under fuzz/artifacts"; exit 1
fi
echo "no crashes"
