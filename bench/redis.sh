#!/usr/bin/env bash
# Measures admissions per second with counters shared in Redis, against the
# ceiling of the same Redis server in the same run: redis-benchmark calling a
# trivial script (EVALSHA of "return 1") with the same concurrency.
#
#   bench/redis.sh            full run (release build, 10 s per measurement)
#   bench/redis.sh --quick    short run (2 s per measurement)
#   bench/redis.sh --debug    use the debug build (numbers meaningless; for CI,
#                             which only checks that the script works)
#
# Redis: QUOTAWATCH_BENCH_REDIS_URL, default redis://127.0.0.1:6379. Needs
# redis-cli and redis-benchmark (Debian's redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10
profile=release
for arg in "$@"; do
    case "$arg" in
        --quick) duration=2 ;;
        --debug) profile=dev ;;
        *) echo "usage: bench/redis.sh [--quick] [--debug]" >&2; exit 2 ;;
    esac
done
target_dir=$([ "$profile" = release ] && echo release || echo debug)
url=${QUOTAWATCH_BENCH_REDIS_URL:-redis://127.0.0.1:6379}
hostport=${url#redis://}
hostport=${hostport%%/*}
host=${hostport%%:*}
port=${hostport##*:}
concurrency=64

cargo build --quiet --profile "$profile" --example shared_admissions
admissions="target/$target_dir/examples/shared_admissions"

sha=$(redis-cli -h "$host" -p "$port" SCRIPT LOAD "return 1")
# redis-benchmark runs a count, not a time: size it from a short probe.
probe=$(redis-benchmark -h "$host" -p "$port" -c "$concurrency" -n 20000 --csv EVALSHA "$sha" 0 |
    awk -F'"' 'NR==2 {print int($4)}')
ceiling=$(redis-benchmark -h "$host" -p "$port" -c "$concurrency" -n $((probe * duration)) --csv \
    EVALSHA "$sha" 0 | awk -F'"' 'NR==2 {print $4}')
ours=$("$admissions" --redis "$url" --concurrency "$concurrency" --duration "${duration}s")

python3 - "$ceiling" "$ours" "$profile" "$concurrency" <<'PY'
import json, sys
ceiling, ours, profile, concurrency = float(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
ratio = ours["per_second"] / ceiling
print(f"shared-counter admissions ({profile} build, {concurrency} in flight, same Redis server)")
print(f"  redis-benchmark, trivial EVALSHA (ceiling): {ceiling:12.0f} calls/s")
print(f"  quotawatch admissions through the engine:   {ours['per_second']:12.0f} admissions/s"
      f"  (p50 {ours['p50_ms']:.3f} ms, p99 {ours['p99_ms']:.3f} ms)")
print(f"  ratio: {ratio:.2f}; Redis script calls per admission: {ours['script_calls_per_admission']:.3f}")
failures = []
if abs(ours["script_calls_per_admission"] - 1) > 0.01:
    failures.append("an admission took other than one script call")
if profile == "release" and ratio < 0.5:
    failures.append("below 50% of the ceiling")
if profile == "release" or failures:
    print("targets (>= 50% of the ceiling, one round trip per admission):",
          "met" if not failures else "NOT met: " + "; ".join(failures))
sys.exit(1 if failures else 0)
PY
