#!/usr/bin/env bash
# Shows where quotawatch's CPU goes under bench/proxy.sh's upstream and
# closed-loop load (the loadgen example), for JSON answers at 64 connections
# and streamed answers at 16: perf samples the release build's process on
# the CPU clock (`-e cpu-clock`, which works where hardware counters do not,
# as in most virtual machines) with DWARF call graphs, and inferno draws a
# flame graph of each load.
#
#   bench/profile.sh [--quick] [OUT_DIR]
#
# Needs perf (Debian's linux-perf) and inferno's tools on the PATH
# (`cargo install inferno`). Writes OUT_DIR/json.svg and OUT_DIR/stream.svg
# with their folded stacks (default OUT_DIR: profile/ in cargo's target
# directory), and prints for each load the share of samples spent in each
# part of the work and the functions that use the most CPU themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10
out=
for arg in "$@"; do
    case "$arg" in
        --quick) seconds=3 ;;
        -*) echo "usage: bench/profile.sh [--quick] [OUT_DIR]" >&2; exit 2 ;;
        *) out=$arg ;;
    esac
done
for tool in perf inferno-collapse-perf inferno-flamegraph; do
    if ! command -v "$tool" >/dev/null; then
        echo "bench/profile.sh: $tool is not on the PATH (perf: Debian's linux-perf;" \
            "inferno-*: cargo install inferno)" >&2
        exit 1
    fi
done

cargo build --quiet --release --bin quotawatch --example loadgen
# Cargo builds where CARGO_TARGET_DIR says, if set.
bin="${CARGO_TARGET_DIR:-target}/release/quotawatch"
loadgen="${CARGO_TARGET_DIR:-target}/release/examples/loadgen"
out=${out:-"${CARGO_TARGET_DIR:-target}/profile"}
mkdir -p "$out"

source bench/lib.sh
start_upstream
start_quotawatch
echo "profiling quotawatch (release build) for $seconds s per load; upstream: $upstream_name"

profile() { # name, body file, query, connections
    # The load runs a second longer than the sampling, which starts once
    # every connection is busy.
    local load
    "$loadgen" --url "$proxy/chat/completions$3" --body "$2" --key "$key" --connections "$4" \
        --duration "$((seconds + 2))s" >"$work/$1.load" &
    load=$!
    pids+=("$load")
    sleep 1
    perf record --quiet -e cpu-clock -F 997 --call-graph dwarf -p "$qw_pid" -o "$work/$1.perf" \
        -- sleep "$seconds" 2>"$work/$1.perf.err"
    wait "$load"
    perf script -i "$work/$1.perf" 2>/dev/null | inferno-collapse-perf --all >"$out/$1.folded"
    inferno-flamegraph --title "quotawatch: $1, $4 connections" <"$out/$1.folded" >"$out/$1.svg"
    echo
    echo "$1 ($4 connections; $(cat "$work/$1.load")); flame graph: $out/$1.svg"
    python3 - "$out/$1.folded" <<'PY'
import collections, re, sys
stacks = []
for line in open(sys.argv[1]):
    frames, weight = line.rstrip("\n").rsplit(" ", 1)
    stacks.append((frames.split(";"), int(weight)))
# The weight of a cpu-clock sample is the CPU time it stands for, in ns.
total = sum(weight for _, weight in stacks)

# Time in the kernel is named after what entered it: the C library call
# of a system call (on loopback, a send also runs the receiver's TCP
# stack), or an interrupt.
SYSTEM_CALLS = (
    ("sending (writev, send)", r"writev|send"),
    ("receiving (recv, read)", r"recv|read"),
    ("waking and parking threads (futex)", r"futex|lll_lock|pthread_cond"),
    ("waiting for events (epoll_wait)", r"epoll"),
)
# Time in user space goes to the part of the work of the frame nearest
# the sampled instruction that belongs to one (inlined frames carry short
# names, so a part is recognised where its crate's name appears).
PARTS = (
    ("allocation (malloc, free)", r"malloc|free|realloc|calloc|tcache|unlink_chunk|__rust_alloc|__rust_dealloc|^_?mi_"),
    ("copying memory (memcpy, memmove)", r"memcpy|memmove|memset"),
    ("token estimate (tiktoken)", r"tiktoken"),
    ("JSON (serde_json)", r"serde_json"),
    ("quotawatch's scanning of bodies and streams", r"quotawatch::proxy::scan"),
    ("quotawatch's engine (admission, settlement)", r"quotawatch::(engine|domain)"),
    ("logging and tracing", r"tracing|quotawatch::telemetry"),
    ("metrics", r"metrics|prometheus"),
    ("SQL (sqlx, SQLite)", r"sqlx|sqlite3"),
    ("Redis", r"redis::"),
    ("quotawatch's proxy, the rest", r"quotawatch::"),
    ("hyper, client side (the upstream's connection)", r"hyper_util::client|hyper::client|role::Client"),
    ("hyper and axum, server side (the client's connection)", r"hyper|axum|tower|http::"),
    ("tokio's runtime", r"tokio"),
)

def part(frames):
    for depth, frame in enumerate(frames):
        if frame.endswith("_[k]"):
            if not any(f.startswith("entry_SYSCALL") for f in frames[depth:]):
                return "kernel: interrupts and preemption"
            caller = frames[depth - 1] if depth else ""
            name = next((name for name, pattern in SYSTEM_CALLS if re.search(pattern, caller)), "other system calls")
            return "kernel: " + name
    for frame in reversed(frames):
        for name, pattern in PARTS:
            if re.search(pattern, frame):
                return name
    return "other"

shares = collections.Counter()
for frames, weight in stacks:
    shares[part(frames)] += weight
print(f"  {total / 1e9:.2f} s of CPU sampled; each part's share:")
for name, weight in shares.most_common():
    print(f"    {weight / total * 100:5.1f}%  {name}")
own = collections.Counter()
for frames, weight in stacks:
    own[frames[-1]] += weight
print("  functions using the most CPU themselves:")
for frame, weight in own.most_common(8):
    print(f"    {weight / total * 100:5.1f}%  {frame[:110]}")
PY
}

profile json "$work/body.json" "" 64
profile stream "$work/stream.json" "?answer=stream" 16
