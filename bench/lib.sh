# Shared by bench/proxy.sh and bench/profile.sh (sourced, not run): a
# temporary directory cleaned up on exit with every process started in it,
# the upstream (stock nginx when installed, else the built-in mock),
# quotawatch in front of it with a hundred workspaces, and the processes'
# CPU time.
#
# The caller sets `bin` (the quotawatch binary) before start_upstream and
# start_quotawatch.

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Runs a command until it succeeds, for at most 10 s; then says what did
# not become ready and fails.
wait_until() { # description, command...
    local what=$1
    shift
    for _ in $(seq 1 200); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "bench: $what did not become ready" >&2
    return 1
}

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

# The CPU time (user and system, every thread, exited ones included) that
# processes and their children have used, in nanoseconds. It is the time
# /proc/PID/stat counts as utime+stime, read from the process's CPU-time
# clock (clock_getcpuclockid) because /proc counts in 10 ms ticks, too
# coarse for an idle process's share of a core over two seconds. The
# children are nginx's workers; quotawatch and the mock have none.
cpu_ns() { # pid...
    python3 - "$@" <<'PY'
import os, sys, time
roots = set(sys.argv[1:])
processes = set(roots)
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        # The parent's pid is the second field after the command's name,
        # which is in parentheses and may hold spaces.
        if stat[stat.rindex(")") + 2:].split()[1] in roots:
            processes.add(entry)
# A process's CPU-time clock id, as glibc's clock_getcpuclockid builds it.
print(sum(time.clock_gettime_ns(((~int(pid)) << 3) | 2) for pid in processes))
PY
}

# An OpenAI-shaped request for the closed-loop and fixed-rate loads, and
# the same asking for a streamed answer.
echo '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":20}' >"$work/body.json"
echo '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":20,"stream":true}' >"$work/stream.json"

# Starts the upstream and sets `upstream` (its /v1 URL), `upstream_pid`
# and `upstream_name`. Stock nginx serves OpenAI's recorded answers as
# fixed texts, as the mock does, at a fraction of the mock's cost, so that
# the proxy's own cost stands out. nginx cannot choose its answer by the
# request body's `stream` field: a request that wants the streamed answer
# says so in its query as well (`?answer=stream`), which quotawatch passes
# upstream as sent and the mock ignores.
start_upstream() {
    if ! command -v nginx >/dev/null; then
        "$bin" mock-upstream --listen 127.0.0.1:0 >"$work/mock.out" 2>&1 &
        upstream_pid=$!
        pids+=("$upstream_pid")
        upstream=$(address_from "$work/mock.out" "mock OpenAI upstream listening on ")
        upstream_name="quotawatch's mock upstream (nginx is not installed)"
        return 0
    fi
    mkdir -p "$work/nginx"
    python3 - "$work/nginx" tests/fixtures/openai <<'PY'
import socket, sys
prefix, fixtures = sys.argv[1], sys.argv[2]

def quoted(text):
    """`text` as one single-quoted nginx string."""
    # nginx would read a `$` as the start of a variable's name.
    assert "$" not in text, "an answer holds a $"
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"

def fixture(name):
    return open(f"{fixtures}/{name}").read()

# OpenAI's headers, as the mock sends them on every answer, less the
# content type, which each answer sets.
headers = [line.split(": ", 1) for line in fixture("chat_completion.headers").splitlines()[1:]]
add_headers = "\n".join(f"        add_header {name} {quoted(value)};"
                        for name, value in headers if name.lower() != "content-type")
answers = "\n".join(
    f"""        location = /answers/{name} {{
            internal;
            default_type {quoted(content_type)};
            return 200 {quoted(fixture(file))};
        }}"""
    for name, file, content_type in (
        ("chat", "chat_completion.json", "application/json"),
        # The stream with the usage chunk, which quotawatch asks for.
        ("chat_stream", "chat_completion_stream_include_usage.sse", "text/event-stream; charset=utf-8"),
        ("embeddings", "embeddings.json", "application/json"),
    ))
# A free port: the kernel's choice for a socket closed right away.
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
open(f"{prefix}/nginx.conf", "w").write(f"""daemon off;
master_process on;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp_paths}
    # The large-body measurement sends 30 MiB.
    client_max_body_size 0;
    # Connections stay open, as OpenAI's do, rather than closing after
    # nginx's default of 1,000 requests.
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
{add_headers}
        location = /v1/chat/completions {{
            if ($arg_answer = stream) {{
                rewrite ^ /answers/chat_stream last;
            }}
            rewrite ^ /answers/chat last;
        }}
        location = /v1/embeddings {{
            rewrite ^ /answers/embeddings last;
        }}
{answers}
    }}
}}
""")
print(port, file=open(f"{prefix}/port", "w"))
PY
    nginx -p "$work/nginx" -e "$work/nginx/error.log" -c "$work/nginx/nginx.conf" &
    upstream_pid=$!
    pids+=("$upstream_pid")
    upstream="http://127.0.0.1:$(cat "$work/nginx/port")/v1"
    if ! wait_until nginx curl -sf -X POST -o /dev/null "$upstream/chat/completions"; then
        cat "$work/nginx/error.log" >&2
        return 1
    fi
    upstream_name="$(nginx -v 2>&1 | sed 's/^nginx version: //'), one worker per core"
}

# Starts quotawatch in front of the upstream with a hundred workspaces, each
# with the four request and token limits (too high to be reached), and sets
# `qw_pid`, `proxy` (its /v1 URL) and `key` (the first workspace's).
# Settings in the environment apply.
start_quotawatch() {
    local big=1000000000000 admin=bench-admin-key-0123456789 base
    for n in $(seq -w 0 99); do
        printf '[[workspaces]]\nid = "bench%s"\nname = "Benchmark %s"\n[workspaces.limits]\n' "$n" "$n"
        printf 'requests_per_minute = %s\nrequests_per_day = %s\ntokens_per_minute = %s\ntokens_per_day = %s\n\n' \
            $big $big $big $big
    done >"$work/quotawatch.toml"
    QUOTA_ADMIN_RESET_KEY=$admin OPENAI_API_KEY=sk-bench \
    QUOTAWATCH_UPSTREAM_URL="$upstream" QUOTAWATCH_LOG=${QUOTAWATCH_LOG:-warn} \
        "$bin" --config "$work/quotawatch.toml" --database-url "sqlite://$work/bench.db" \
        serve --listen 127.0.0.1:0 >"$work/qw.out" 2>"$work/qw.err" &
    qw_pid=$!
    pids+=("$qw_pid")
    base=$(address_from "$work/qw.out" "quotawatch listening on ")
    proxy=$base/v1
    key=$(curl -sf -X POST -H "Authorization: Bearer $admin" "$base/api/workspaces/bench00/keys" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')
}
