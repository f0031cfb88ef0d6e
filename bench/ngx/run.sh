#!/usr/bin/env bash
# The nginx bench (bench/ngx/bench.lua): /health latency on one worker while replaces are in flight,
# cosocket vs blocking libcurl, and /replace throughput under wrk. Prints markdown tables on stdout.
# Needs `make both` (build/luajit/enos/core.so). Knobs: BENCH_NGX_DEVICES, BENCH_NGX_LATENCY_MS,
# BENCH_NGX_INFLIGHT, BENCH_NGX_CONCURRENCY, BENCH_NGX_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v wrk >/dev/null || { echo "bench/ngx: wrk is not installed" >&2; exit 1; }
[ -f build/luajit/enos/core.so ] || { echo "bench/ngx: run make both first" >&2; exit 1; }
exec luajit bench/ngx/bench.lua
