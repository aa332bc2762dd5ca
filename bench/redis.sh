#!/usr/bin/env bash
# Measures admissions per second with counters shared in Redis, against the
# ceiling of the same Redis server in the same run: redis-benchmark calling a
# trivial script (EVALSHA of "return 1") with the same concurrency, measured
# between the runs: each run's ceiling is the mean of the measurements just
# before and just after it, as a shared machine's speed drifts within
# seconds. The
# admissions go to 1, 10 and 100 workspaces: each workspace an admission
# call touches costs Redis more than each admission, so spread traffic is
# the harder case. They are the proxy's, whose reservations the instance
# holds; one more run to 100 workspaces makes the REST API's, which Redis
# records for any instance to settle. A last run settles each of the
# proxy's admissions, as the proxy does.
#
# Workspaces carry the four request and token limits per minute and per
# day. The runs to 100 workspaces, admitted and settled, are made once more
# with budgets per day and per month and three limits on the called model
# (`--budgets --model-limits`), and their ratio to the four limits' figure
# of the same run is reported.
#
#   bench/redis.sh                 full run (release build, 10 s per measurement)
#   bench/redis.sh --quick         short run (2 s per measurement)
#   bench/redis.sh --debug         use the debug build (numbers meaningless; for CI,
#                                  which only checks that the script works)
#   bench/redis.sh --budgets-only  the second runs carry the budgets without
#                                  the limits on models
#
# Redis: QUOTAWATCH_BENCH_REDIS_URL, default redis://127.0.0.1:6379. Needs
# redis-cli and redis-benchmark (Debian's redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10
profile=release
money="--budgets --model-limits"
for arg in "$@"; do
    case "$arg" in
        --quick) duration=2 ;;
        --debug) profile=dev ;;
        --budgets-only) money="--budgets" ;;
        *) echo "usage: bench/redis.sh [--quick] [--debug] [--budgets-only]" >&2; exit 2 ;;
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
# Cargo builds where CARGO_TARGET_DIR says, if set.
admissions="${CARGO_TARGET_DIR:-target}/$target_dir/examples/shared_admissions"

sha=$(redis-cli -h "$host" -p "$port" SCRIPT LOAD "return 1")
# redis-benchmark runs a count, not a time: size it from a short probe.
probe=$(redis-benchmark -h "$host" -p "$port" -c "$concurrency" -n 20000 --csv EVALSHA "$sha" 0 |
    awk -F'"' 'NR==2 {print int($4)}')
# A ceiling measurement takes a third of a run's time.
ceiling() {
    redis-benchmark -h "$host" -p "$port" -c "$concurrency" -n $((probe * duration / 3 + 1)) --csv \
        EVALSHA "$sha" 0 | awk -F'"' 'NR==2 {print $4}'
}
ceilings=("$(ceiling)")
runs=()
# The runs in the order the report lists them; the last two are whole
# requests: each admission settled right after, as the proxy does.
for run in 1 10 100 "100 $money" "100 --settled-anywhere" "100 --settle" "100 --settle $money"; do
    # Word splitting is wanted: a run is its workspaces and flags.
    runs+=("$("$admissions" --redis "$url" --concurrency "$concurrency" --workspaces $run \
        --duration "${duration}s")")
    ceilings+=("$(ceiling)")
done

python3 - "$profile" "$concurrency" "$money" "${ceilings[*]}" "${runs[@]}" <<'PY'
import json, sys
profile, concurrency, money = sys.argv[1], sys.argv[2], sys.argv[3]
ceilings = [float(c) for c in sys.argv[4].split()]
runs = [json.loads(run) for run in sys.argv[5:]]
# Run i sits between ceiling measurements i and i + 1.
around = [(ceilings[i] + ceilings[i + 1]) / 2 for i in range(len(ceilings) - 1)]
*admissions, settled, settled_money = zip(runs, around)
limits = "budgets and three limits on models" if "--model-limits" in money else "budgets"
print(f"shared-counter admissions ({profile} build, {concurrency} in flight, same Redis server)")
print("  redis-benchmark, trivial EVALSHA (ceiling), between the runs: "
      + ", ".join(f"{c:.0f}" for c in ceilings) + " calls/s")
failures = []
names = ["  1 workspace", " 10 workspaces", "100 workspaces", f"100 workspaces with {limits}",
         "100 workspaces, the REST API's (recorded in Redis)"]
for name, (run, ceiling) in zip(names, admissions):
    ratio = run["per_second"] / ceiling
    print(f"  {name}: {run['per_second']:8.0f} admissions/s, ceiling {ceiling:.0f}, "
          f"ratio {ratio:.2f}, {run['script_calls_per_admission']:.3f} script calls per admission "
          f"(p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms)")
    if run["script_calls_per_admission"] > 1.0:
        failures.append(f"more than one script call per admission with {name.strip()}")
    if profile == "release" and ratio < 0.5:
        failures.append(f"below 50% of the ceiling with {name.strip()}")
# A settled request is two operations (admission, settlement), which
# share calls with others as admissions do.
for name, (run, ceiling) in [("", settled), (f" with {limits}", settled_money)]:
    print(f"  100 workspaces{name}, each admission settled: {run['per_second']:8.0f} requests/s, "
          f"ceiling {ceiling:.0f}, ratio {run['per_second'] / ceiling:.2f}, "
          f"{run['script_calls_per_admission']:.3f} script calls per request "
          f"(p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms)")
    if run["script_calls_per_admission"] > 2.0:
        failures.append(f"more than two script calls per settled request{name}")
# What money limits cost, beside the four limits' figure of the same run.
four, with_money = admissions[2][0], admissions[3][0]
print(f"  {limits} against the four limits alone, 100 workspaces: "
      f"admissions {with_money['per_second'] / four['per_second']:.2f}, "
      f"whole requests {settled_money[0]['per_second'] / settled[0]['per_second']:.2f}")
if profile == "release" or failures:
    print("targets (>= 50% of the ceiling, at most one round trip per admission):",
          "met" if not failures else "NOT met: " + "; ".join(failures))
# Only a broken round-trip count fails the script; throughput is reported.
sys.exit(1 if any("script call" in failure for failure in failures) else 0)
PY
