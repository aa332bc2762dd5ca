#!/usr/bin/env bash
# Measures what the /v1 proxy costs: the same load directly against the
# upstream, through quotawatch, and through the bare proxy (the same HTTP
# stack doing nothing else), in one run, on this machine.
#
#   bench/proxy.sh                 full run (release build, 10 s per measurement)
#   bench/proxy.sh --quick         short run (2 s per measurement)
#   bench/proxy.sh --debug         use the debug build (numbers meaningless; for CI,
#                                  which only checks that the script works)
#   bench/proxy.sh --bin PATH      measure another quotawatch binary (an earlier
#                                  build, to compare) with this script's load
#   bench/proxy.sh --check         fail when quotawatch's CPU per request, divided by
#                                  nginx's in the same run, exceeds 1.5x the ratio in
#                                  bench/proxy-baseline.json (JSON or streams)
#   bench/proxy.sh --ratios FILE   also append this run's CPU ratios to FILE (a JSON line)
#   bench/proxy.sh --save-baseline write bench/proxy-baseline.json from the median of
#                                  three release runs with --quick, on this machine
#   bench/proxy.sh --idle-only N   measure only the idle CPU, over N seconds (to compare
#                                  builds with --bin, run after run)
#
# The upstream is stock nginx when installed (bench/lib.sh), serving
# OpenAI's recorded answers, else quotawatch's built-in mock. Each figure is
# measured in this one run:
# - throughput: wrk (Debian's package) when installed, else the loadgen
#   example in closed-loop mode; JSON answers at 64 connections and streamed
#   answers at 16; straight at the upstream, through quotawatch, and through
#   the bare_proxy example: the same HTTP stack forwarding and doing nothing
#   else, the floor under quotawatch's figures;
# - the server CPU per request of quotawatch, of the bare proxy and of the
#   upstream (nginx's master and workers, or the mock) over those runs: the
#   processes' CPU time before and after, over the requests served;
# - latency at a fixed 1,000 requests/s (the loadgen example in open-loop
#   mode), with quotawatch's own account of the time it adds
#   (x-quotawatch-overhead-ms), and with one request at a time (closed loop,
#   one connection), direct, through quotawatch and through the bare proxy;
# - quotawatch's resident memory, sampled throughout, and its CPU while idle
#   with a hundred workspaces;
# - the peak memory one 30 MiB request body costs above idle (two shapes: one
#   long text, and a list of 15 million token ids), read from the kernel's
#   high-water mark after resetting it.
# Issue 19's targets are printed as met or NOT met; they do not fail the
# run. Errors do, and so does --check's regression guard.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10
idle_seconds=10
profile=release
other_bin=
check=
ratios_file=
save_baseline=
idle_only=
baseline_file=bench/proxy-baseline.json
usage="usage: bench/proxy.sh [--quick] [--debug] [--bin PATH] [--check] [--ratios FILE] [--save-baseline] [--idle-only SECONDS]"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) duration=2 idle_seconds=2 ;;
        --debug) profile=dev ;;
        --bin) other_bin=${2:?$usage}; shift ;;
        --check) check=1 ;;
        --ratios) ratios_file=$(realpath "${2:?$usage}"); shift ;;
        --save-baseline) save_baseline=1 ;;
        --idle-only) idle_only=1 idle_seconds=${2:?$usage}; shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$check$save_baseline" ]; then
    if ! command -v nginx >/dev/null; then
        echo "bench/proxy.sh: --check and --save-baseline need nginx (Debian's package nginx):" \
            "the baseline is quotawatch's CPU per request divided by nginx's" >&2
        exit 1
    fi
    if [ "$profile" != release ]; then
        echo "bench/proxy.sh: the baseline is of a release build; --check and --save-baseline" \
            "do not take --debug" >&2
        exit 2
    fi
fi

# The processor's model name: a baseline is kept per kind of machine.
cpu_model() { grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//; s/ *$//'; }

if [ -n "$save_baseline" ]; then
    runs=$(mktemp)
    for _ in 1 2 3; do bench/proxy.sh --quick --ratios "$runs"; done
    python3 - "$runs" "$baseline_file" "$(nproc)" "$(cpu_model)" <<'PY'
import datetime, json, os, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
path, nproc, cpu = sys.argv[2], int(sys.argv[3]), sys.argv[4]
entry = {
    "measured": datetime.date.today().isoformat(),
    "machine": {"nproc": nproc, "cpu": cpu},
    "upstream": runs[0]["upstream"],
    "runs": [{shape: round(run[shape], 3) for shape in ("json", "stream")} for run in runs],
    "ratio": {shape: round(statistics.median(run[shape] for run in runs), 3) for shape in ("json", "stream")},
}
# One entry per kind of machine: the ratio depends on the processor (what
# a loopback send and a wake-up cost beside nginx's own work), so that a
# baseline taken on one would make the guard too strict or too lax on
# another. Saving replaces this machine's entry and keeps the others.
machines = json.load(open(path))["machines"] if os.path.exists(path) else []
machines = [m for m in machines if m["machine"] != entry["machine"]] + [entry]
baseline = {"what": "per kind of machine, quotawatch's CPU per proxied request divided by nginx's CPU per request served directly, in the same run of bench/proxy.sh --quick (release build); the median of three runs. bench/proxy.sh --check fails when a run's ratio exceeds 1.5 times its machine's (on a machine not listed, the most lenient entry's).", "machines": machines}
open(path, "w").write(json.dumps(baseline, indent=2) + "\n")
print(f"wrote {path}: ratios {entry['ratio']} for {cpu}, {nproc} cores")
PY
    rm -f "$runs"
    exit 0
fi

target_dir=$([ "$profile" = release ] && echo release || echo debug)
cargo build --quiet --profile "$profile" --bin quotawatch --example loadgen --example bare_proxy
# Cargo builds where CARGO_TARGET_DIR says, if set.
bin=${other_bin:-"${CARGO_TARGET_DIR:-target}/$target_dir/quotawatch"}
loadgen="${CARGO_TARGET_DIR:-target}/$target_dir/examples/loadgen"
bare_proxy_bin="${CARGO_TARGET_DIR:-target}/$target_dir/examples/bare_proxy"

source bench/lib.sh
start_upstream
start_quotawatch

# Both answers must be what a client expects before any is measured.
proxied() { # base URL, body file, query
    curl -sf -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        --data-binary "@$2" "$1/chat/completions$3"
}
answers_are_right() { # base URL
    local json_answer stream_answer
    json_answer=$(proxied "$1" "$work/body.json" "") || true
    stream_answer=$(proxied "$1" "$work/stream.json" "?answer=stream") || true
    [[ $json_answer == *'"object":"chat.completion"'* && $stream_answer == *'data: [DONE]'* ]]
}
if ! answers_are_right "$proxy"; then
    echo "bench: the proxied answers are not a chat completion and a stream; quotawatch said:" >&2
    cat "$work/qw.err" >&2
    exit 1
fi

# Idle: no traffic, a hundred workspaces.
idle_before=$(cpu_ns "$qw_pid")
sleep "$idle_seconds"
idle_cpu_ns=$(($(cpu_ns "$qw_pid") - idle_before))
idle_line=$(python3 -c 'import sys; print(f"quotawatch idle with 100 workspaces: {int(sys.argv[1]) / 1e9 / int(sys.argv[2]) * 100:.2f}% of a core")' \
    "$idle_cpu_ns" "$idle_seconds")
if [ -n "$idle_only" ]; then
    echo "$idle_line"
    exit 0
fi

"$bare_proxy_bin" "${upstream%/v1}" >"$work/bare.out" 2>&1 &
bare_pid=$!
pids+=("$bare_pid")
bare=$(address_from "$work/bare.out" "bare proxy listening on ")/v1
if ! answers_are_right "$bare"; then
    echo "bench: the bare proxy's answers are not a chat completion and a stream; it said:" >&2
    cat "$work/bare.out" >&2
    exit 1
fi

# Resident memory of quotawatch, sampled until the end.
(while kill -0 "$qw_pid" 2>/dev/null; do
    awk '/^VmRSS/ {print $2}' "/proc/$qw_pid/status" 2>/dev/null || true
    sleep 0.2
done) >"$work/rss.kb" &
pids+=($!)

tool=$(command -v wrk >/dev/null && echo wrk || echo loadgen)

# Closed loop: prints one JSON line with the requests served, errors,
# requests/s, p50 and p99, and the CPU time the proxy (quotawatch, or the
# bare proxy) and the upstream used meanwhile.
closed_loop() { # url, key (may be empty), body file, connections, proxy's pid
    local proxy_pid=${5:-$qw_pid} proxy_before up_before proxy_after up_after result
    proxy_before=$(cpu_ns "$proxy_pid")
    up_before=$(cpu_ns "$upstream_pid")
    if [ "$tool" = wrk ]; then
        {
            echo 'wrk.method = "POST"'
            echo "wrk.body = [[$(cat "$3")]]"
            echo 'wrk.headers["Content-Type"] = "application/json"'
            if [ -n "$2" ]; then echo "wrk.headers[\"Authorization\"] = \"Bearer $2\""; fi
        } >"$work/post.lua"
        wrk -t2 -c"$4" -d"${duration}s" --latency -s "$work/post.lua" "$1" >"$work/wrk.out"
        result=$(awk '
            function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
            / requests in / {requests=$1}
            /Requests\/sec/ {rps=$2}
            $1=="50%" {p50=ms($2)}
            $1=="99%" {p99=ms($2)}
            /Non-2xx/ {errors+=$NF}
            /Socket errors/ {gsub(/,/, ""); errors+=$4+$6+$8+$10}
            END {printf "{\"requests\":%d,\"errors\":%d,\"rps\":%s,\"p50_ms\":%.3f,\"p99_ms\":%.3f}\n", requests, errors, rps, p50, p99}
        ' "$work/wrk.out")
    else
        result=$("$loadgen" --url "$1" --body "$3" ${2:+--key "$2"} --connections "$4" --duration "${duration}s")
    fi
    proxy_after=$(cpu_ns "$proxy_pid")
    up_after=$(cpu_ns "$upstream_pid")
    echo "${result%\}},\"proxy_cpu_ns\":$((proxy_after - proxy_before)),\"upstream_cpu_ns\":$((up_after - up_before))}"
}

loadgen_run() { # url, key (may be empty), loadgen's mode flag and its value
    "$loadgen" --url "$1" --body "$work/body.json" ${2:+--key "$2"} "$3" "$4" --duration "${duration}s"
}

echo "quotawatch proxy benchmark ($profile build, ${duration} s per run, upstream: $upstream_name," \
    "throughput by $tool, $(nproc) cores shared by the servers and the load)"
# The bare proxy runs before quotawatch each time, so that what quotawatch
# does after a run (its writes to the store each second) does not fall in
# the bare proxy's measurement.
json_direct=$(closed_loop "$upstream/chat/completions" "" "$work/body.json" 64)
json_bare=$(closed_loop "$bare/chat/completions" "$key" "$work/body.json" 64 "$bare_pid")
json_proxied=$(closed_loop "$proxy/chat/completions" "$key" "$work/body.json" 64)
stream_direct=$(closed_loop "$upstream/chat/completions?answer=stream" "" "$work/stream.json" 16)
stream_bare=$(closed_loop "$bare/chat/completions?answer=stream" "$key" "$work/stream.json" 16 "$bare_pid")
stream_proxied=$(closed_loop "$proxy/chat/completions?answer=stream" "$key" "$work/stream.json" 16)
fixed_direct=$(loadgen_run "$upstream/chat/completions" "" --rate 1000)
fixed_bare=$(loadgen_run "$bare/chat/completions" "$key" --rate 1000)
fixed_proxied=$(loadgen_run "$proxy/chat/completions" "$key" --rate 1000)
single_direct=$(loadgen_run "$upstream/chat/completions" "" --connections 1)
single_bare=$(loadgen_run "$bare/chat/completions" "$key" --connections 1)
single_proxied=$(loadgen_run "$proxy/chat/completions" "$key" --connections 1)
max_rss_kb=$(sort -n "$work/rss.kb" | tail -1)

# Peak memory for one 30 MiB body above idle: the high-water mark is reset
# (clear_refs 5), one body is sent, and the new mark is read. Idle is read
# once, before the first body: an allocator may keep the first body's
# memory for later use, and the second body's peak is then counted above
# the same idle, memory kept included, not above the memory kept.
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
idle_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$qw_pid/status")
large_body_peak() { # file, path -> "peak_above_idle_kib body_kib status"
    local status peak
    echo 5 >"/proc/$qw_pid/clear_refs"
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' --data-binary "@$1" "$proxy$2")
    peak=$(awk '/^VmHWM/ {print $2}' "/proc/$qw_pid/status")
    echo "$((peak - idle_kb)) $(($(stat -c %s "$1") / 1024)) $status"
}
read -r text_peak text_kib text_status < <(large_body_peak "$work/text.json" /chat/completions)
read -r ids_peak ids_kib ids_status < <(large_body_peak "$work/ids.json" /embeddings)

CPU_MODEL=$(cpu_model) IDLE_LINE=$idle_line python3 - "$profile" "$(command -v nginx >/dev/null && echo nginx || echo mock)" "${check:+$baseline_file}" \
    "$ratios_file" "$json_direct" "$json_proxied" "$json_bare" "$stream_direct" "$stream_proxied" \
    "$stream_bare" "$fixed_direct" "$fixed_proxied" "$fixed_bare" "$single_direct" "$single_proxied" \
    "$single_bare" "${max_rss_kb:-0}" \
    "$idle_cpu_ns" "$idle_seconds" "$text_peak" "$text_kib" "$text_status" \
    "$ids_peak" "$ids_kib" "$ids_status" <<'PY'
import json, os, sys
profile, upstream, baseline_file, ratios_file = sys.argv[1:5]
json_direct, json_proxied, json_bare, stream_direct, stream_proxied, stream_bare, fixed_direct, \
    fixed_proxied, fixed_bare, single_direct, single_proxied, single_bare = map(json.loads, sys.argv[5:17])
rss_mib = int(sys.argv[17]) / 1024
idle_share = int(sys.argv[18]) / 1e9 / int(sys.argv[19])
bodies = (("long text", *sys.argv[20:23]), ("token ids", *sys.argv[23:26]))

def cpu_us(run, process):
    return run[f"{process}_cpu_ns"] / 1e3 / run["requests"]

# "bare" is the bare_proxy example: the same HTTP stack doing nothing but
# forwarding, the floor no change to quotawatch's own work can go below.
print(f"{'':36}{'direct':>10}{'through':>10}{'ratio':>8}{'bare':>10}{'ratio':>8}")
for name, direct, proxied, bare in (("JSON, 64 connections", json_direct, json_proxied, json_bare),
                                    ("streams, 16 connections", stream_direct, stream_proxied, stream_bare)):
    print(f"{name + ': req/s':36}{direct['rps']:10.0f}{proxied['rps']:10.0f}{proxied['rps'] / direct['rps']:8.2f}"
          f"{bare['rps']:10.0f}{bare['rps'] / direct['rps']:8.2f}")
    print(f"{name + ': p50 ms':36}{direct['p50_ms']:10.3f}{proxied['p50_ms']:10.3f}{'':8}{bare['p50_ms']:10.3f}")
    print(f"{name + ': p99 ms':36}{direct['p99_ms']:10.3f}{proxied['p99_ms']:10.3f}{'':8}{bare['p99_ms']:10.3f}")
for percentile in ("p50", "p99"):
    print(f"{'1000 req/s: ' + percentile + ' ms':36}{fixed_direct[percentile + '_ms']:10.3f}"
          f"{fixed_proxied[percentile + '_ms']:10.3f}{'':8}{fixed_bare[percentile + '_ms']:10.3f}")
print(f"{'one at a time: p50 ms':36}{single_direct['p50_ms']:10.3f}{single_proxied['p50_ms']:10.3f}"
      f"{'':8}{single_bare['p50_ms']:10.3f}")
print(f"{'server CPU per request, µs':36}{'upstream':>10}{'quotawatch':>11}{'ratio':>7}{'bare':>8}{'qw/bare':>8}")
ratios = {}
for shape, name, direct, proxied, bare in (
        ("json", "JSON, 64 connections", json_direct, json_proxied, json_bare),
        ("stream", "streams, 16 connections", stream_direct, stream_proxied, stream_bare)):
    upstream_us, quotawatch_us = cpu_us(direct, "upstream"), cpu_us(proxied, "proxy")
    ratios[shape] = quotawatch_us / upstream_us
    bare_us = cpu_us(bare, "proxy")
    print(f"{'  ' + name:36}{upstream_us:10.1f}{quotawatch_us:11.1f}{ratios[shape]:7.2f}{bare_us:8.1f}"
          f"{quotawatch_us / bare_us:8.2f}"
          f"   (upstream behind quotawatch: {cpu_us(proxied, 'upstream'):.1f}, behind bare: {cpu_us(bare, 'upstream'):.1f})")
added_p99 = fixed_proxied["p99_ms"] - fixed_direct["p99_ms"]
added_single_p50 = single_proxied["p50_ms"] - single_direct["p50_ms"]
print(f"added latency: p99 {added_p99:.3f} ms at 1000 req/s, p50 {added_single_p50:.3f} ms one at a time "
      f"(client view); quotawatch's own overhead at 1000 req/s p50 {fixed_proxied['overhead_p50_ms']:.3f} ms, "
      f"p99 {fixed_proxied['overhead_p99_ms']:.3f} ms; the bare proxy adds p99 "
      f"{fixed_bare['p99_ms'] - fixed_direct['p99_ms']:.3f} ms and p50 {single_bare['p50_ms'] - single_direct['p50_ms']:.3f} ms")
print(f"quotawatch resident memory, max: {rss_mib:.1f} MiB")
print(os.environ["IDLE_LINE"])

errors = []
body_ratios = []
for shape, peak, body, status in bodies:
    ratio = int(peak) / int(body)
    body_ratios.append(ratio)
    print(f"one {int(body) / 1024:.0f} MiB body ({shape}): peak {int(peak) / 1024:.1f} MiB above idle "
          f"({ratio:.2f}x the body), answered {status}")
    if status != "200":
        errors.append(f"the {shape} body was answered {status}")
runs = {"JSON direct": json_direct, "JSON through": json_proxied, "JSON bare": json_bare,
        "streams direct": stream_direct, "streams through": stream_proxied, "streams bare": stream_bare, "1000 req/s direct": fixed_direct,
        "1000 req/s through": fixed_proxied, "1000 req/s bare": fixed_bare,
        "one at a time direct": single_direct, "one at a time through": single_proxied,
        "one at a time bare": single_bare}
for name, run in runs.items():
    if run["errors"] or not run["requests"]:
        errors.append(f"{name}: {run['errors']} errors in {run['requests']} requests")

if profile == "release":
    json_cpu, stream_cpu = cpu_us(json_proxied, "proxy"), cpu_us(stream_proxied, "proxy")
    targets = (
        (f"CPU per JSON request {json_cpu:.1f} µs", "at most 30 µs", json_cpu <= 30),
        (f"CPU per stream {stream_cpu:.1f} µs", "at most 40 µs", stream_cpu <= 40),
        (f"JSON throughput {json_proxied['rps'] / json_direct['rps']:.2f} of direct", "at least 0.35",
         json_proxied["rps"] / json_direct["rps"] >= 0.35),
        (f"streams' throughput {stream_proxied['rps'] / stream_direct['rps']:.2f} of direct", "at least 0.35",
         stream_proxied["rps"] / stream_direct["rps"] >= 0.35),
        (f"p99 added at 1000 req/s {added_p99:.3f} ms", "under 0.5 ms", added_p99 < 0.5),
        (f"p50 added one at a time {added_single_p50:.3f} ms", "under 0.1 ms", added_single_p50 < 0.1),
        (f"peak RSS {rss_mib:.1f} MiB", "under 64 MiB", rss_mib < 64),
        (f"idle CPU {idle_share * 100:.2f}% of a core", "under 0.2%", idle_share < 0.002),
        (f"a 30 MiB body's peak, at most {max(body_ratios):.2f}x its size", "under 2x", max(body_ratios) < 2),
    )
    # Issue 19's targets, set against nginx, and the large bodies' target.
    print(f"targets{'' if upstream == 'nginx' else ' (set with nginx as the upstream, here the mock)'}:")
    for figure, target, met in targets:
        print(f"  {figure + ' (' + target + ')':60} {'met' if met else 'NOT met'}")

if ratios_file:
    with open(ratios_file, "a") as out:
        out.write(json.dumps({"upstream": upstream, **ratios}) + "\n")

if baseline_file:
    machine = {"nproc": len(os.sched_getaffinity(0)), "cpu": os.environ["CPU_MODEL"]}
    machines = json.load(open(baseline_file))["machines"]
    baseline = next((m for m in machines if m["machine"] == machine), None)
    if baseline is None:
        baseline = max(machines, key=lambda m: m["ratio"]["json"] + m["ratio"]["stream"])
        print(f"no baseline of this machine ({machine['cpu']}, {machine['nproc']} cores) in "
              f"{baseline_file}: the most lenient one is used")
    print(f"regression guard: quotawatch's CPU per request over nginx's, against {baseline_file} "
          f"({baseline['measured']}, {baseline['machine']['cpu']}, {baseline['machine']['nproc']} cores)")
    for shape, ratio in ratios.items():
        limit = 1.5 * baseline["ratio"][shape]
        print(f"  {shape:8} {ratio:7.2f}  baseline {baseline['ratio'][shape]:.2f}, limit {limit:.2f}: "
              f"{'ok' if ratio <= limit else 'EXCEEDED'}")
        if ratio > limit:
            errors.append(f"the {shape} CPU ratio {ratio:.2f} exceeds 1.5x the baseline's {baseline['ratio'][shape]:.2f}")

if errors:
    print("run failed:", "; ".join(errors))
sys.exit(1 if errors else 0)
PY
