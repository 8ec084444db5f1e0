#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, on loopback only.
#
#   cluster/local.sh up N        head (dashboard on 127.0.0.1) + N worker nodes (raylets)
#   cluster/local.sh add [N]     N more worker nodes (default 1) join the running cluster
#   cluster/local.sh kill NAME   SIGKILL one node's whole process tree (e.g. worker2):
#                                a host dying, no drain; `down` still cleans up after it
#   cluster/local.sh status      what `up` started, and whether it is alive
#   cluster/local.sh down        stop exactly what `up`/`add` started, nothing else
#
# Every node is a `ray start --block` run in its own session (setsid), so its PID is its
# process-group id, recorded in $PSDET_CLUSTER_DIR/pids. `down` signals those groups,
# then kills what is left of their process trees (Ray workers run in process groups of
# their own) and any process whose command line names this cluster's state dir. It
# never runs `ray stop`, which would stop every Ray on the machine.
#
# Each node gets its own --temp-dir, as if it were its own host. Nodes sharing one temp
# dir collide on socket names when started together (a raylet died with "bind: Address
# already in use"), and share runtime_resources/, where one node's runtime-env agent
# deletes and re-extracts a job's working_dir under the feet of the job's driver (seen:
# FileNotFoundError from os.getcwd() right after ray.init() in the job).
#
# Knobs (environment):
#   PSDET_CLUSTER_DIR   state: pids, logs, each node's --temp-dir (default /tmp/psdet-cluster-$UID;
#                       keep it short: Ray puts unix sockets under it)
#   RAY_PORT            GCS port (default 6379, or a free one if 6379 is taken)
#   DASHBOARD_PORT      dashboard / job server port (default 8265, or a free one)
#   HEAD_CPUS           CPUs the head offers (default 1; the sweep's driver runs there)
#   WORKER_CPUS         CPUs each worker node offers (default 1)
#   WORKER_GPUS         GPUs each worker node offers (default 0)
#   OBJECT_STORE_MB     object store per node (default 200)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the token; default ~/.ray/auth_token, made with
#                       `ray get-auth-token --generate` when missing
#   WORKER_PRIVATE_DIR  an absolute directory the worker nodes must NOT see, as if they were
#                       other hosts: each worker runs in a mount namespace of its own with an
#                       empty tmpfs over it (needs root and unshare). For checking that a
#                       local --storage which not every node sees is refused.
#
# Each node offers a custom resource of its own: the head `psdet_head: 1`, worker i
# `psdet_node_<i>: 1` (and `psdet_worker: 1`), so work can be pinned to a node.
set -euo pipefail

STATE_DIR="${PSDET_CLUSTER_DIR:-/tmp/psdet-cluster-$(id -u)}"
PIDS_FILE="$STATE_DIR/pids"          # lines "<name> <pid>"; pid == pgid
ENV_FILE="$STATE_DIR/env"            # `source` it to talk to this cluster
START_TIMEOUT_S="${START_TIMEOUT_S:-90}"

# Loopback only. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every Ray process (raylets,
# workers, drivers started under them) takes 127.0.0.1 as its node address; we also
# pass --node-ip-address 127.0.0.1 and bind the dashboard to 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
# On SIGTERM a node first drains, 30 s by default; `down` need not wait that long.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-2}"

# `ray start --address` refuses to start a worker node while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (a "multi-node needs =1" guard meant for macOS and
# Windows). Setting =1 is no way out: Ray would then swap 127.0.0.1 for the machine's
# interface address. So worker nodes run the real `ray start` CLI with =0 and only that
# guard lifted: the CLI module sees ENABLE_RAY_CLUSTER=True, while the IP lookup
# (ray._private.services) keeps seeing False and answers 127.0.0.1.
RAY_START_WORKER_PY='import sys, types
import ray._private.ray_constants as real_constants
import ray.scripts.scripts as ray_cli
guard_lifted = types.ModuleType("ray_constants_for_cli")
guard_lifted.__dict__.update(real_constants.__dict__)
guard_lifted.ENABLE_RAY_CLUSTER = True
ray_cli.ray_constants = guard_lifted
sys.argv[0] = "ray"
ray_cli.cli()'

die() { echo "local.sh: $*" >&2; exit 2; }

find_ray() {
    if command -v ray >/dev/null 2>&1; then RAY="$(command -v ray)"
    elif [[ -x "$(dirname "$0")/../.venv/bin/ray" ]]; then RAY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/ray"
    else die "no 'ray' on PATH; activate the project's venv (pip install -e '.[sweep]')"
    fi
    PYTHON="$(dirname "$RAY")/python"
    [[ -x "$PYTHON" ]] || PYTHON=python3
}

port_free() {  # port_free PORT: exit 0 when 127.0.0.1:PORT can be bound
    python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

pick_port() {  # pick_port REQUESTED DEFAULT NAME
    if [[ -n "$1" ]]; then
        port_free "$1" || die "$3 port $1 is in use"
        echo "$1"
    elif port_free "$2"; then
        echo "$2"
    else
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    fi
}

# A zombie still answers `kill -0` (and in a container whose PID 1 does not reap, a
# killed node stays one), so look at the process state instead.
alive() {  # alive PID
    ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'
}

group_alive() {  # group_alive PGID: some non-zombie process is in that process group
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

token_source() {  # where this cluster's token comes from (and make the default one if needed)
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        echo "the RAY_AUTH_TOKEN environment variable"
    elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
        echo "$RAY_AUTH_TOKEN_PATH (RAY_AUTH_TOKEN_PATH)"
    else
        [[ -s "$HOME/.ray/auth_token" ]] || "$RAY" get-auth-token --generate >/dev/null
        echo "$HOME/.ray/auth_token (Ray's default; print it with: ray get-auth-token)"
    fi
}

auth_header() {
    local token="${RAY_AUTH_TOKEN:-}"
    [[ -n "$token" ]] || token="$(cat "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}")"
    echo "Authorization: Bearer $token"
}

node_alive() {  # node_alive DASHBOARD_PORT RESOURCE: the node offering RESOURCE is ALIVE
    curl -sf --max-time 5 -H "$(auth_header)" "http://127.0.0.1:$1/api/v0/nodes?limit=10000&detail=true" 2>/dev/null |
        python3 -c 'import json, sys
nodes = json.load(sys.stdin)["data"]["result"]["result"]
sys.exit(0 if any(n["state"] == "ALIVE" and sys.argv[1] in n.get("resources_total", {}) for n in nodes) else 1)' \
        "$2" 2>/dev/null
}

wait_for_node() {  # wait_for_node DASHBOARD_PORT RESOURCE NAME PID: until the node has joined
    local deadline=$((SECONDS + START_TIMEOUT_S))
    while (( SECONDS < deadline )); do
        if node_alive "$1" "$2"; then return 0; fi
        if ! alive "$4"; then echo "local.sh: $3 (pid $4) exited; see $STATE_DIR/$3.log" >&2; return 1; fi
        sleep 1
    done
    echo "local.sh: $3 did not join within ${START_TIMEOUT_S}s; see $STATE_DIR/$3.log" >&2
    return 1
}

hide_private_dir() {  # sets HIDE: the command prefix that hides WORKER_PRIVATE_DIR from a node
    HIDE=()
    [[ -n "${WORKER_PRIVATE_DIR:-}" ]] || return 0
    [[ "$WORKER_PRIVATE_DIR" = /* && -d "$WORKER_PRIVATE_DIR" ]] ||
        die "WORKER_PRIVATE_DIR must be an existing absolute directory"
    [[ "$STATE_DIR/" != "$WORKER_PRIVATE_DIR"/* ]] || die "WORKER_PRIVATE_DIR must not contain $STATE_DIR"
    command -v unshare >/dev/null || die "WORKER_PRIVATE_DIR needs unshare (util-linux)"
    HIDE=(unshare --mount --propagation private -- sh -c 'mount -t tmpfs psdet-private "$0" && exec "$@"'
          "$WORKER_PRIVATE_DIR")
}

start_worker() {  # start_worker INDEX GCS_PORT: launch worker node INDEX (does not wait)
    local i="$1"
    rm -rf "$STATE_DIR/w$i"
    setsid "${HIDE[@]}" "$PYTHON" -c "$RAY_START_WORKER_PY" start --block \
        --address "127.0.0.1:$2" --node-ip-address 127.0.0.1 --dashboard-agent-listen-port 0 \
        --num-cpus "${WORKER_CPUS:-1}" --num-gpus "${WORKER_GPUS:-0}" \
        --resources "{\"psdet_node_$i\": 1, \"psdet_worker\": 1}" \
        --object-store-memory $(( ${OBJECT_STORE_MB:-200} * 1024 * 1024 )) \
        --temp-dir "$STATE_DIR/w$i" --disable-usage-stats \
        > "$STATE_DIR/worker$i.log" 2>&1 < /dev/null &
    echo "worker$i $!" >> "$PIDS_FILE"
}

wait_for_worker() {  # wait_for_worker INDEX DASHBOARD_PORT
    local pid
    pid="$(awk -v n="worker$1" '$1 == n { print $2 }' "$PIDS_FILE")"
    wait_for_node "$2" "psdet_node_$1" "worker$1" "$pid"
}

read_ports() {  # GCS_PORT, DASH_PORT of the running cluster
    [[ -f "$ENV_FILE" ]] || die "no cluster is up from $STATE_DIR (run: local.sh up N)"
    GCS_PORT="$(sed -n 's/^export RAY_ADDRESS=127.0.0.1://p' "$ENV_FILE")"
    DASH_PORT="$(sed -n 's|^export RAY_API_SERVER_ADDRESS=http://127.0.0.1:||p' "$ENV_FILE")"
}

cmd_up() {
    local workers="$1" name pid
    [[ "$workers" =~ ^[0-9]+$ ]] || die "usage: local.sh up N   (N = number of worker nodes)"
    if [[ -f "$PIDS_FILE" ]]; then
        while read -r name pid; do
            if alive "$pid"; then die "a cluster is already up from $STATE_DIR; run 'local.sh down' first"; fi
        done < "$PIDS_FILE"
    fi
    find_ray
    hide_private_dir
    mkdir -p "$STATE_DIR"
    rm -rf "$STATE_DIR/head" "$STATE_DIR"/w[0-9]* "$ENV_FILE"
    : > "$PIDS_FILE"
    local token_from gcs_port dash_port client_port
    token_from="$(token_source)"
    gcs_port="$(pick_port "${RAY_PORT:-}" 6379 GCS)"
    dash_port="$(pick_port "${DASHBOARD_PORT:-}" 8265 dashboard)"
    client_port="$(pick_port "" 10001 ray-client)"

    trap 'echo "local.sh: up failed; stopping what it started" >&2; cmd_down >&2' ERR
    setsid "$RAY" start --head --block \
        --node-ip-address 127.0.0.1 --port "$gcs_port" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
        --ray-client-server-port "$client_port" --dashboard-agent-listen-port 0 \
        --num-cpus "${HEAD_CPUS:-1}" --num-gpus 0 --resources '{"psdet_head": 1}' \
        --object-store-memory $(( ${OBJECT_STORE_MB:-200} * 1024 * 1024 )) \
        --temp-dir "$STATE_DIR/head" --disable-usage-stats \
        > "$STATE_DIR/head.log" 2>&1 < /dev/null &
    local head_pid=$!
    echo "head $head_pid" >> "$PIDS_FILE"
    wait_for_node "$dash_port" psdet_head head "$head_pid"
    # Worker nodes start together: each has a temp dir of its own (see the top).
    local i
    for (( i = 1; i <= workers; i++ )); do start_worker "$i" "$gcs_port"; done
    for (( i = 1; i <= workers; i++ )); do wait_for_worker "$i" "$dash_port"; done
    trap - ERR

    {
        echo "export RAY_ADDRESS=127.0.0.1:$gcs_port"
        echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash_port"
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
        if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
    } > "$ENV_FILE"

    cat <<EOF
Ray cluster up: head + $workers worker node(s), every one on 127.0.0.1
  address     127.0.0.1:$gcs_port  (ray.init(address=...), orchestrate/tune.py --address ...)
  dashboard   http://127.0.0.1:$dash_port  (also the job server: ray job submit --address http://127.0.0.1:$dash_port)
  token       $token_from
              clients need RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
              ~/.ray/auth_token); HTTP: header 'Authorization: Bearer <token>'; browser: paste the token
  client env  source $ENV_FILE
  logs        $STATE_DIR/*.log and $STATE_DIR/<node>/session_latest/logs
  stop        cluster/local.sh down
EOF
}

cmd_add() {
    local count="$1" name pid last=0
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "usage: local.sh add [N]"
    read_ports
    find_ray
    hide_private_dir
    while read -r name pid; do
        if [[ "$name" =~ ^worker([0-9]+)$ ]] && (( BASH_REMATCH[1] > last )); then last="${BASH_REMATCH[1]}"; fi
    done < "$PIDS_FILE"
    local i
    for (( i = last + 1; i <= last + count; i++ )); do start_worker "$i" "$GCS_PORT"; done
    for (( i = last + 1; i <= last + count; i++ )); do
        wait_for_worker "$i" "$DASH_PORT" || die "worker$i did not join; see $STATE_DIR/worker$i.log"
        echo "worker$i joined 127.0.0.1:$GCS_PORT"
    done
}

descendants() {  # descendants PID...: those PIDs and all their live descendants
    ps -eo pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { grew = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 }
            } while (grew)
            for (p in keep) print p
        }'
}

cmd_kill() {
    local target="$1" name pid found=""
    [[ -f "$PIDS_FILE" ]] || die "no cluster is up from $STATE_DIR"
    while read -r name pid; do
        if [[ "$name" == "$target" ]]; then found="$pid"; fi
    done < "$PIDS_FILE"
    [[ -n "$found" ]] || die "no node named '$target' (see: local.sh status)"
    alive "$found" || die "$target (pid $found) is not running"
    local tree; tree="$(descendants "$found")"
    # shellcheck disable=SC2086
    kill -KILL $tree 2>/dev/null || true
    echo "killed $target: $(echo $tree | wc -w) processes (pid $found and its descendants)"
}

cmd_down() {
    [[ -f "$PIDS_FILE" ]] || { echo "local.sh: nothing to stop (no $PIDS_FILE)"; return 0; }
    local name pid pids=()
    # Workers first, head last (tac): the GCS should outlive its raylets.
    while read -r name pid; do pids+=("$pid"); done < <(tac "$PIDS_FILE")
    # Ray workers live in process groups of their own and rename themselves "ray::...";
    # note the whole tree before anything dies.
    local tree; tree="$(descendants "${pids[@]}")"
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 30)) left
    while (( SECONDS < deadline )); do
        left=0
        for pid in "${pids[@]}"; do if group_alive "$pid"; then left=1; fi; done
        (( left == 0 )) && break
        sleep 0.5
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    # shellcheck disable=SC2086
    kill -KILL $tree 2>/dev/null || true
    local proc
    for proc in /proc/[0-9]*; do  # anything else still naming our state dir
        if { tr '\0' ' ' < "$proc/cmdline"; } 2>/dev/null | grep -qF -- "$STATE_DIR/"; then
            kill -KILL "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    rm -f "$PIDS_FILE" "$ENV_FILE"
    echo "local.sh: stopped ${#pids[@]} node(s) started from $STATE_DIR"
}

cmd_status() {
    [[ -f "$PIDS_FILE" ]] || { echo "no cluster from $STATE_DIR"; return 0; }
    local name pid
    while read -r name pid; do
        if alive "$pid"; then echo "$name  pid $pid  running"; else echo "$name  pid $pid  gone"; fi
    done < "$PIDS_FILE"
    if [[ -f "$ENV_FILE" ]]; then cat "$ENV_FILE"; fi
}

case "${1:-}" in
    up) cmd_up "${2:-2}" ;;
    add) cmd_add "${2:-1}" ;;
    kill) [[ $# -ge 2 ]] || die "usage: local.sh kill NAME"; cmd_kill "$2" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) die "usage: local.sh up N | add [N] | kill NAME | status | down" ;;
esac
