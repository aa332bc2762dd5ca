#!/usr/bin/env bash
# Counts the user-space instructions quotawatch spends on one proxied call:
# the release build runs under valgrind's callgrind in front of
# bench/proxy.sh's upstream (stock nginx when installed, else the mock),
# one client sends 200 calls to warm up, the counters are zeroed, and the
# next N calls are counted. Instructions are repeatable run after run
# (within about 2% here), whatever else a shared machine is doing, which
# makes small changes visible where CPU time is not; they leave out the
# kernel's work (about a third of the CPU time, bench/profile.sh).
#
#   bench/instructions.sh [--stream] [--bin PATH] [--bare] [N]   default N: 1000
#
# --bare counts the bare_proxy example instead: the same HTTP stack doing
# nothing but forwarding, the floor under quotawatch's count.
#
# Needs valgrind (Debian's package). Prints one line: the instructions
# per call, JSON answers (or streamed ones with --stream).
set -euo pipefail
cd "$(dirname "$0")/.."

calls=1000
query=
body=body
other_bin=
bare=
usage="usage: bench/instructions.sh [--stream] [--bin PATH] [--bare] [N]"
while [ $# -gt 0 ]; do
    case "$1" in
        --stream) query="?answer=stream" body=stream ;;
        --bin) other_bin=$(realpath "${2:?$usage}"); shift ;;
        --bare) bare=1 ;;
        [0-9]*) calls=$1 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done
if ! command -v valgrind >/dev/null; then
    echo "bench/instructions.sh: needs valgrind (Debian's package valgrind)" >&2
    exit 1
fi
if [ -n "$bare" ] && [ -n "$other_bin" ]; then
    echo "bench/instructions.sh: --bare counts the bare proxy, not a quotawatch binary: drop --bin" >&2
    exit 2
fi
if [ -n "$bare" ]; then
    cargo build --quiet --release --example bare_proxy
fi
if [ -z "$other_bin" ]; then
    # quotawatch is also the upstream when nginx is not installed.
    cargo build --quiet --release --bin quotawatch
fi
# Cargo builds where CARGO_TARGET_DIR says, if set.
real_bin=${other_bin:-$(realpath "${CARGO_TARGET_DIR:-target}/release/quotawatch")}

source bench/lib.sh
# The mock upstream, when nginx is not installed, runs as "$bin".
bin=$real_bin
start_upstream
if [ -n "$bare" ]; then
    name="the bare proxy"
    valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
        "${CARGO_TARGET_DIR:-target}/release/examples/bare_proxy" "${upstream%/v1}" \
        >"$work/bare.out" 2>"$work/bare.err" &
    qw_pid=$!
    pids+=("$qw_pid")
    proxy=$(address_from "$work/bare.out" "bare proxy listening on ")/v1
    # It forwards whatever it is sent; the key only makes the calls alike.
    key=sk-bare
else
    name=quotawatch
    # start_quotawatch runs "$bin": here a wrapper that runs it under callgrind.
    bin=$work/under-callgrind.sh
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/callgrind.out "%s" "$@"\n' \
        "$work" "$real_bin" >"$bin"
    chmod +x "$bin"
    start_quotawatch
fi

send() { # calls
    python3 - "$proxy/chat/completions$query" "$key" "$work/$body.json" "$1" <<'PY'
import http.client, sys, urllib.parse
url, key, body, calls = sys.argv[1], sys.argv[2], open(sys.argv[3], "rb").read(), int(sys.argv[4])
parsed = urllib.parse.urlparse(url)
path = parsed.path + ("?" + parsed.query if parsed.query else "")
connection = http.client.HTTPConnection(parsed.hostname, parsed.port)
for _ in range(calls):
    connection.request("POST", path, body, {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    answer = connection.getresponse()
    answer.read()
    if answer.status != 200:
        sys.exit(f"bench: a call was answered {answer.status}")
PY
}
send 200
callgrind_control --zero "$qw_pid" >/dev/null 2>&1
send "$calls"
callgrind_control --dump "$qw_pid" >/dev/null 2>&1
# The dump is written by the profiled process: wait for it.
wait_until "callgrind's dump" compgen -G "$work/callgrind.out.*"
dump=$(compgen -G "$work/callgrind.out.*" | head -1)
wait_until "callgrind's totals" grep -q '^totals:' "$dump"
instructions=$(awk '/^totals:/ {print $2}' "$dump")
echo "$name: $((instructions / calls)) user-space instructions per ${body/body/JSON} call ($instructions over $calls calls)"
