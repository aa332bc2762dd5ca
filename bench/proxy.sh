#!/usr/bin/env bash
# Measures what the /v1 proxy costs: the same load directly against the mock
# upstream and through quotawatch, in one run, on this machine.
#
#   bench/proxy.sh            full run (release build, 10 s per measurement)
#   bench/proxy.sh --quick    short run (2 s per measurement)
#   bench/proxy.sh --debug    use the debug build (numbers meaningless; for CI,
#                             which only checks that the script works)
#   bench/proxy.sh --bin PATH measure another quotawatch binary (an earlier
#                             build, to compare) with this script's load
#
# Throughput: wrk (Debian's package) with 64 connections when installed, else
# the loadgen example in closed-loop mode. Latency at a fixed 1,000 requests/s:
# the loadgen example in open-loop mode, plus quotawatch's own account of the
# time it adds (x-quotawatch-overhead-ms). Resident memory of quotawatch is
# sampled throughout. Last, the peak memory one 30 MiB request body costs
# above idle (two shapes: one long text, and a list of 15 million token ids),
# read from the kernel's high-water mark after resetting it.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10s
profile=release
other_bin=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) duration=2s ;;
        --debug) profile=dev ;;
        --bin) other_bin=$2; shift ;;
        *) echo "usage: bench/proxy.sh [--quick] [--debug] [--bin PATH]" >&2; exit 2 ;;
    esac
    shift
done
target_dir=$([ "$profile" = release ] && echo release || echo debug)

cargo build --quiet --profile "$profile" --bin quotawatch --example loadgen
bin=${other_bin:-"target/$target_dir/quotawatch"}
loadgen="target/$target_dir/examples/loadgen"

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Waits for a line starting with $2 in file $1 and prints the rest of it.
address_from() {
    for _ in $(seq 1 200); do
        if line=$(grep -m1 "^$2" "$1" 2>/dev/null); then
            echo "${line#"$2"}"
            return 0
        fi
        sleep 0.05
    done
    echo "bench: no '$2' in $1:" >&2
    cat "$1" >&2
    return 1
}

"$bin" mock-upstream --listen 127.0.0.1:0 >"$work/mock.out" 2>&1 &
pids+=($!)
upstream=$(address_from "$work/mock.out" "mock OpenAI upstream listening on ")

db="sqlite://$work/bench.db"
big=1000000000000
"$bin" --database-url "$db" workspace add bench --requests-per-minute $big --requests-per-day $big \
    --tokens-per-minute $big --tokens-per-day $big >/dev/null 2>&1
key=$("$bin" --database-url "$db" key create bench 2>/dev/null | grep -m1 -o 'qw_[A-Za-z0-9_-]*')

QUOTA_ADMIN_RESET_KEY=bench-admin-key-0123456789 OPENAI_API_KEY=sk-bench \
QUOTAWATCH_UPSTREAM_URL="$upstream" QUOTAWATCH_LOG=warn \
    "$bin" --database-url "$db" serve --listen 127.0.0.1:0 >"$work/qw.out" 2>"$work/qw.err" &
qw_pid=$!
pids+=($qw_pid)
proxy=$(address_from "$work/qw.out" "quotawatch listening on ")/v1

echo '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":20}' >"$work/body.json"

# Resident memory of quotawatch, sampled until the end.
(while kill -0 "$qw_pid" 2>/dev/null; do
    awk '/^VmRSS/ {print $2}' "/proc/$qw_pid/status" 2>/dev/null || true
    sleep 0.2
done) >"$work/rss.kb" &
pids+=($!)

throughput() { # url, key (may be empty) -> "rps p50_ms p99_ms"
    if command -v wrk >/dev/null; then
        {
            echo 'wrk.method = "POST"'
            echo "wrk.body = [[$(cat "$work/body.json")]]"
            echo 'wrk.headers["Content-Type"] = "application/json"'
            [ -n "$2" ] && echo "wrk.headers[\"Authorization\"] = \"Bearer $2\""
        } >"$work/post.lua"
        wrk -t2 -c64 -d"$duration" --latency -s "$work/post.lua" "$1" >"$work/wrk.out"
        awk '
            function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
            /Requests\/sec/ {rps=$2}
            $1=="50%" {p50=ms($2)}
            $1=="99%" {p99=ms($2)}
            END {printf "%s %.3f %.3f\n", rps, p50, p99}' "$work/wrk.out"
    else
        "$loadgen" --url "$1" --body "$work/body.json" ${2:+--key "$2"} --connections 64 --duration "$duration" |
            python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %.3f %.3f" % (r["rps"], r["p50_ms"], r["p99_ms"]))'
    fi
}

fixed_rate() { # url, key -> JSON line
    "$loadgen" --url "$1" --body "$work/body.json" ${2:+--key "$2"} --rate 1000 --duration "$duration"
}

tool=$(command -v wrk >/dev/null && echo wrk || echo loadgen)
echo "quotawatch proxy benchmark ($profile build, $duration per run, throughput by $tool, $(nproc) cores shared with the load generator)"
read -r direct_rps direct_p50 direct_p99 < <(throughput "$upstream/chat/completions" "")
read -r proxy_rps proxy_p50 proxy_p99 < <(throughput "$proxy/chat/completions" "$key")
direct_fixed=$(fixed_rate "$upstream/chat/completions" "")
proxy_fixed=$(fixed_rate "$proxy/chat/completions" "$key")
max_rss_kb=$(sort -n "$work/rss.kb" | tail -1)

# Peak memory for one 30 MiB body above idle: the high-water mark is reset
# (clear_refs 5), one body is sent, and the new mark is read.
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
size = 30 << 20
text = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "word " * (size // 5)}]})
open(f"{work}/text.json", "w").write(text)
ids = json.dumps({"model": "text-embedding-3-small", "input": [1] * (size // 2)}, separators=(",", ":"))
open(f"{work}/ids.json", "w").write(ids)
PY
large_body_peak() { # file, path -> "peak_above_idle_kib body_kib status"
    local idle status peak
    idle=$(awk '/^VmRSS/ {print $2}' "/proc/$qw_pid/status")
    echo 5 >"/proc/$qw_pid/clear_refs"
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' --data-binary "@$1" "$proxy$2")
    peak=$(awk '/^VmHWM/ {print $2}' "/proc/$qw_pid/status")
    echo "$((peak - idle)) $(($(stat -c %s "$1") / 1024)) $status"
}
read -r text_peak text_kib text_status < <(large_body_peak "$work/text.json" /chat/completions)
read -r ids_peak ids_kib ids_status < <(large_body_peak "$work/ids.json" /embeddings)

python3 - "$direct_rps" "$direct_p50" "$direct_p99" "$proxy_rps" "$proxy_p50" "$proxy_p99" \
    "$direct_fixed" "$proxy_fixed" "${max_rss_kb:-0}" "$profile" \
    "$text_peak" "$text_kib" "$text_status" "$ids_peak" "$ids_kib" "$ids_status" <<'PY'
import json, sys
d_rps, d_p50, d_p99, p_rps, p_p50, p_p99 = map(float, sys.argv[1:7])
direct, proxied = json.loads(sys.argv[7]), json.loads(sys.argv[8])
rss_mib = int(sys.argv[9]) / 1024
release = sys.argv[10] == "release"
print(f"{'':28}{'direct':>12}{'through':>12}{'ratio':>8}")
print(f"{'64 connections: req/s':28}{d_rps:12.0f}{p_rps:12.0f}{p_rps / d_rps:8.2f}")
print(f"{'64 connections: p50 ms':28}{d_p50:12.3f}{p_p50:12.3f}")
print(f"{'64 connections: p99 ms':28}{d_p99:12.3f}{p_p99:12.3f}")
print(f"{'1000 req/s: p50 ms':28}{direct['p50_ms']:12.3f}{proxied['p50_ms']:12.3f}")
print(f"{'1000 req/s: p99 ms':28}{direct['p99_ms']:12.3f}{proxied['p99_ms']:12.3f}")
added_p99 = proxied["p99_ms"] - direct["p99_ms"]
print(f"added latency at 1000 req/s: p99 {added_p99:.3f} ms (client view); "
      f"quotawatch's own overhead p50 {proxied['overhead_p50_ms']:.3f} ms, p99 {proxied['overhead_p99_ms']:.3f} ms")
print(f"quotawatch resident memory, max: {rss_mib:.1f} MiB")
failures = []
for shape, peak, body, status in (("long text", *sys.argv[11:14]), ("token ids", *sys.argv[14:17])):
    ratio = int(peak) / int(body)
    print(f"one {int(body) / 1024:.0f} MiB body ({shape}): peak {int(peak) / 1024:.1f} MiB above idle "
          f"({ratio:.2f}x the body), answered {status}")
    if status != "200": failures.append(f"the {shape} body was answered {status}")
    if ratio >= 2.0: failures.append(f"the {shape} body cost {ratio:.2f}x its size")
if direct["errors"] or proxied["errors"] or not proxied["requests"]:
    failures.append(f"errors: direct {direct['errors']}, proxied {proxied['errors']}")
if release:
    if p_rps / d_rps < 0.25: failures.append("throughput below 25% of direct")
    if proxied["overhead_p99_ms"] >= 1.0: failures.append("p99 overhead at 1000 req/s is 1 ms or more")
    if rss_mib >= 64: failures.append("resident memory reached 64 MiB")
    print("targets (throughput >= 25% of direct, p99 overhead < 1 ms, RSS < 64 MiB, a body < 2x its size):",
          "met" if not failures else "NOT met: " + "; ".join(failures))
elif failures:
    print("run failed:", "; ".join(failures))
sys.exit(1 if failures and (release or direct["errors"] or proxied["errors"]) else 0)
PY
