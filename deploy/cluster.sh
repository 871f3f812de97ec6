#!/usr/bin/env bash
# deploy/cluster.sh - a project-local 3-node RabbitMQ cluster on one machine.
#
# Usage: deploy/cluster.sh start|stop|status|urls|kill NODE|restart [NODE]|ctl NODE ARGS...
#
# Three nodes (amqptasks-c1..c3@localhost) joined into one cluster, each with
# its own ports, data and logs under <project>/.amqptasks/cluster/nodeN/, one
# Erlang cookie for the three (.amqptasks/cluster/.erlang.cookie) and an epmd
# of their own. Everything listens on 127.0.0.1 only. It never touches the
# single node of deploy/broker.sh (other ports, names, cookie and epmd), so
# both can run at once. See deploy/README.md.
#
# NODE is 1, 2 or 3 (or the node name). `kill NODE` is SIGKILL: what a crash
# or a pulled plug looks like to the other nodes and to clients.
#
# Environment:
#   AMQPTASKS_CLUSTER_AMQP_PORT   AMQP port of node 1 (default 5681; node N: +N-1)
#   AMQPTASKS_CLUSTER_MGMT_PORT   management port of node 1 (default 15681)
#   AMQPTASKS_CLUSTER_DIST_PORT   Erlang distribution port of node 1 (default 25681)
#   AMQPTASKS_CLUSTER_EPMD_PORT   the cluster's own epmd (default 4381)
#   AMQPTASKS_CLUSTER_START_TIMEOUT  seconds to wait for a node (default 120)
#
# Exit status of `status`: 0 all three running and clustered, 3 none running,
# 1 anything in between (says which).

set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(dirname -- "$SCRIPT_DIR")
CLUSTER_DIR="$ROOT/.amqptasks/cluster"
RMQ_BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

AMQP_BASE=${AMQPTASKS_CLUSTER_AMQP_PORT:-5681}
MGMT_BASE=${AMQPTASKS_CLUSTER_MGMT_PORT:-15681}
DIST_BASE=${AMQPTASKS_CLUSTER_DIST_PORT:-25681}
EPMD_PORT=${AMQPTASKS_CLUSTER_EPMD_PORT:-4381}
START_TIMEOUT=${AMQPTASKS_CLUSTER_START_TIMEOUT:-120}
STOP_TIMEOUT=60

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat <<EOF
Usage: $PROG start|stop|status|urls|kill NODE|restart [NODE]|ctl NODE ARGS...

  start          start the three nodes (those not running) and join them into one cluster
  stop           stop every node (and the cluster's epmd)
  status         one line per node; exit 0 all clustered, 3 none running, 1 in between
  urls           the AMQP URLs of the three nodes, comma-separated (broker.url takes that)
  kill NODE      SIGKILL node NODE (1, 2 or 3): a crash, as the others see it
  restart NODE   start node NODE again (after kill or stop) and wait until it is back
  restart        stop, then start the whole cluster
  ctl NODE ARGS  rabbitmqctl against node NODE, e.g. $PROG ctl 1 cluster_status
EOF
}

for p in "$AMQP_BASE" "$MGMT_BASE" "$DIST_BASE" "$EPMD_PORT"; do
    [[ $p =~ ^[0-9]+$ ]] && ((p >= 1 && p + 2 <= 65535)) || die "invalid port '$p'"
done

name_of() { echo "amqptasks-c$1@localhost"; }
amqp_port() { echo $((AMQP_BASE + $1 - 1)); }
mgmt_port() { echo $((MGMT_BASE + $1 - 1)); }
dist_port() { echo $((DIST_BASE + $1 - 1)); }
node_dir() { echo "$CLUSTER_DIR/node$1"; }
url_of() { echo "amqp://guest:guest@localhost:$(amqp_port "$1")/%2F"; }

now_ms() {
    local t=${EPOCHREALTIME:-}
    if [[ -n $t ]]; then
        t=${t//[.,]/}
        echo $((10#$t / 1000))
    else
        echo $(($(date +%s) * 1000))
    fi
}
fmt_secs() { printf '%d.%01ds' $(($1 / 1000)) $((($1 % 1000) / 100)); }

node_arg() { # "1" | "c1" | "amqptasks-c1@localhost" -> 1
    local n=${1:-}
    n=${n#amqptasks-}
    n=${n%@localhost}
    n=${n#c}
    [[ $n =~ ^[123]$ ]] || die "NODE must be 1, 2 or 3 (got '${1:-}')"
    echo "$n"
}

installed() { [[ -x $RMQ_BIN/rabbitmq-server && -x $RMQ_BIN/rabbitmqctl ]]; }

ensure_installed() {
    installed && return 0
    if ((EUID == 0)) && command -v apt-get >/dev/null 2>&1; then
        say "rabbitmq-server is not installed; installing it with apt-get ..."
        apt-get update -qq || warn "apt-get update failed; trying the install anyway"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server \
            || die "apt-get install rabbitmq-server failed"
        installed || die "rabbitmq-server was installed but $RMQ_BIN/rabbitmq-server is missing"
        return 0
    fi
    die "RabbitMQ is not installed ($RMQ_BIN/rabbitmq-server not found); install rabbitmq-server (Debian/Ubuntu), or use 'docker compose --profile cluster up -d'"
}

# The environment of node $1's scripts. env -i keeps the caller's RABBITMQ_*
# and ERL_* variables (and /etc/rabbitmq) out; HOME holds the shared cookie.
node_env() {
    local n=$1 dir
    dir=$(node_dir "$n")
    local ctl_min=$((DIST_BASE + 100 + 10 * (n - 1)))
    NODE_ENV=(
        PATH=/usr/sbin:/usr/bin:/sbin:/bin
        LANG=C.UTF-8
        LC_ALL=C.UTF-8
        HOME="$CLUSTER_DIR"
        RABBITMQ_NODENAME="$(name_of "$n")"
        RABBITMQ_USE_LONGNAME=false
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        RABBITMQ_MNESIA_BASE="$dir/mnesia"
        RABBITMQ_LOG_BASE="$dir/log"
        RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
        ERL_CRASH_DUMP="$dir/log/erl_crash.dump"
        RABBITMQ_DIST_PORT="$(dist_port "$n")"
        RABBITMQ_CTL_DIST_PORT_MIN="$ctl_min"
        RABBITMQ_CTL_DIST_PORT_MAX="$((ctl_min + 9))"
        ERL_EPMD_ADDRESS=127.0.0.1
        ERL_EPMD_PORT="$EPMD_PORT"
        # Loopback only; and no busy-waiting schedulers: four Erlang VMs share two cores.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none"
        "RABBITMQ_CTL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
    )
}

ctl() { # ctl N ARGS...
    local n=$1
    shift
    node_env "$n"
    (cd -- "$CLUSTER_DIR" && env -i "${NODE_ENV[@]}" "$RMQ_BIN/rabbitmqctl" -n "$(name_of "$n")" "$@")
}
diag() {
    local n=$1
    shift
    node_env "$n"
    (cd -- "$CLUSTER_DIR" && env -i "${NODE_ENV[@]}" "$RMQ_BIN/rabbitmq-diagnostics" -n "$(name_of "$n")" "$@")
}

prepare() {
    mkdir -p -- "$CLUSTER_DIR" || die "cannot create $CLUSTER_DIR"
    chmod 0700 -- "$CLUSTER_DIR"
    local cookie="$CLUSTER_DIR/.erlang.cookie"
    if [[ ! -s $cookie ]]; then
        local letters=ABCDEFGHIJKLMNOPQRSTUVWXYZ b value=""
        for b in $(od -An -N32 -tu1 /dev/urandom); do value+=${letters:b%26:1}; done
        (umask 077 && printf '%s' "$value" >"$cookie")
        chmod 0400 -- "$cookie"
    fi
    local n dir
    for n in "${NODES[@]}"; do
        dir=$(node_dir "$n")
        mkdir -p -- "$dir/log"
        cat >"$dir/rabbitmq.conf" <<EOF
# Generated by deploy/cluster.sh on every start - edit the script, not this file.
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$n")
log.console = false
log.file.level = warning
# The recommended mode for a 3-node cluster: a node cut off from the majority pauses.
cluster_partition_handling = pause_minority
EOF
        echo '[rabbitmq_management].' >"$dir/enabled_plugins"
        echo '# Generated by deploy/cluster.sh; keeps /etc/rabbitmq/rabbitmq-env.conf out.' >"$dir/rabbitmq-env.conf"
    done
}

is_alive() {
    local stat
    [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
    stat=$(ps -p "$1" -o stat= 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}
is_beam() {
    local comm
    is_alive "${1:-}" || return 1
    comm=$(ps -p "$1" -o comm= 2>/dev/null) || return 1
    [[ $comm == beam* ]]
}
read_pid() { [[ -r $1 ]] && head -c 32 -- "$1" 2>/dev/null | tr -dc '0-9'; }
node_pid() {
    local pid
    pid=$(read_pid "$(node_dir "$1")/rabbitmq.pid") || return 1
    is_beam "$pid" || return 1
    echo "$pid"
}
port_open() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_answers() { diag "$1" -q ping -t 10 >/dev/null 2>&1; }

take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>>"$CLUSTER_DIR/.lock"
    flock -w 300 9 || die "timed out waiting for another $PROG run (lock $CLUSTER_DIR/.lock)"
}

log_tail() {
    local dir f
    dir=$(node_dir "$1")
    for f in "$dir/log/startup.log" "$dir/log/$(name_of "$1").log"; do
        if [[ -s $f ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 15 -- "$f" >&2
        fi
    done
}

mgmt_answers() {
    python3 - "http://127.0.0.1:$(mgmt_port "$1")/api/overview" <<'EOF' >/dev/null 2>&1
import base64, sys, urllib.request
req = urllib.request.Request(sys.argv[1])
req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
urllib.request.urlopen(req, timeout=5).read()
EOF
}

launch() { # launch N: start node N in its own session, in the background
    local n=$1 dir p
    dir=$(node_dir "$n")
    for p in "$(amqp_port "$n")" "$(mgmt_port "$n")" "$(dist_port "$n")"; do
        port_open "$p" && die "port $p on 127.0.0.1 is already in use by another process (node $n's); stop it or choose other ports (AMQPTASKS_CLUSTER_*_PORT)"
    done
    node_env "$n"
    rm -f -- "$dir/rabbitmq.pid"
    (
        exec 9>&- # the node must not hold our lock
        cd -- "$dir"
        exec setsid -w env -i "${NODE_ENV[@]}" "$RMQ_BIN/rabbitmq-server"
    ) </dev/null >"$dir/log/startup.log" 2>&1 &
    echo $! >"$dir/launcher.pid"
}

wait_ready() { # wait_ready N DEADLINE_MS
    local n=$1 deadline=$2 launcher left
    launcher=$(read_pid "$(node_dir "$n")/launcher.pid") || launcher=""
    while ! port_open "$(amqp_port "$n")"; do
        if [[ -n $launcher ]] && ! is_alive "$launcher"; then
            echo "node $n exited during start-up" >&2
            return 1
        fi
        (($(now_ms) < deadline)) || { echo "timed out waiting for node $n's AMQP port" >&2; return 1; }
        sleep 0.3
    done
    left=$(((deadline - $(now_ms)) / 1000))
    ((left >= 5)) || left=5
    ctl "$n" -q await_startup -t "$left" >/dev/null 2>&1 || { echo "node $n: await_startup failed" >&2; return 1; }
    until mgmt_answers "$n"; do
        (($(now_ms) < deadline)) || { echo "timed out waiting for node $n's management API" >&2; return 1; }
        sleep 0.3
    done
}

# Node N's view of the running members (names, one a line).
running_members() {
    ctl "$1" -q cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
try:
    print("\n".join(json.load(sys.stdin).get("running_nodes", [])))
except Exception:
    pass'
}

join() { # join N: make node N a member of node 1's cluster (a no-op if it is one)
    local n=$1 first
    first=$(name_of 1)
    if ctl "$n" -q cluster_status --formatter json 2>/dev/null | grep -q "\"$first\""; then
        return 0
    fi
    say "joining $(name_of "$n") to $first ..."
    # rabbitmqctl prints the joining node's transient errors; they go to its log dir.
    local out
    out="$(node_dir "$n")/log/join.log"
    {
        ctl "$n" -q stop_app && ctl "$n" -q reset && ctl "$n" -q join_cluster "$first" \
            && ctl "$n" -q start_app
    } >"$out" 2>&1 || { tail -n 20 -- "$out" >&2; die "node $n could not join $first (see $out)"; }
}

cmd_start() {
    ensure_installed
    prepare
    take_lock
    local t0 n started=()
    t0=$(now_ms)
    for n in "${NODES[@]}"; do
        if node_pid "$n" >/dev/null; then
            continue
        fi
        launch "$n"
        started+=("$n")
    done
    if ((${#started[@]})); then
        say "starting node(s) ${started[*]} (AMQP 127.0.0.1:$AMQP_BASE-$((AMQP_BASE + 2)), management $MGMT_BASE-$((MGMT_BASE + 2))) ..."
    fi
    # All at once: a restarted member waits for its peers' tables, so starting them in
    # sequence could wait on a node that is not launched yet.
    for n in "${NODES[@]}"; do
        if ! wait_ready "$n" $((t0 + START_TIMEOUT * 1000)); then
            log_tail "$n"
            die "node $n failed to start (logs in $(node_dir "$n")/log); '$PROG stop' cleans up"
        fi
    done
    join 2
    join 3
    local members
    members=$(running_members 1 | wc -l)
    ((members == 3)) || die "node 1 sees $members running member(s), expected 3 ($PROG ctl 1 cluster_status)"
    say "cluster up in $(fmt_secs $(($(now_ms) - t0))): $(cmd_urls)"
}

stop_node() { # stop_node N: clean shutdown, escalating to SIGTERM, then SIGKILL
    local n=$1 pid launcher deadline
    pid=$(node_pid "$n") || pid=""
    launcher=$(read_pid "$(node_dir "$n")/launcher.pid") || launcher=""
    if [[ -z $pid ]] && ! is_alive "$launcher"; then
        return 0
    fi
    ctl "$n" -q shutdown -t "$STOP_TIMEOUT" >/dev/null 2>&1 || true
    deadline=$(($(now_ms) + 15000))
    local -a signals=(TERM KILL)
    while is_beam "$pid" || is_alive "$launcher"; do
        if (($(now_ms) >= deadline)); then
            ((${#signals[@]})) || die "could not stop node $n (pid ${pid:-$launcher})"
            warn "node $n did not stop; sending SIG${signals[0]}"
            is_beam "$pid" && kill -s "${signals[0]}" "$pid" 2>/dev/null
            is_alive "$launcher" && kill -s "${signals[0]}" "$launcher" 2>/dev/null
            signals=("${signals[@]:1}")
            deadline=$(($(now_ms) + 15000))
        fi
        sleep 0.3
    done
    rm -f -- "$(node_dir "$n")/rabbitmq.pid" "$(node_dir "$n")/launcher.pid"
}

cmd_stop() {
    [[ -d $CLUSTER_DIR ]] || { say "not running"; return 0; }
    installed || { say "not running"; return 0; }
    take_lock
    local t0 n pids=()
    t0=$(now_ms)
    for n in "${NODES[@]}"; do
        stop_node "$n" &
        pids+=($!)
    done
    local failed=0 pid
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    # The cluster's own epmd (never the default one on 4369, which other nodes use).
    node_env 1
    env -i "${NODE_ENV[@]}" epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    ((failed == 0)) || die "a node did not stop"
    say "stopped in $(fmt_secs $(($(now_ms) - t0)))"
}

cmd_status() {
    if ! installed || [[ ! -d $CLUSTER_DIR ]]; then
        say "not running"
        return 3
    fi
    local n up=0 pid members
    for n in "${NODES[@]}"; do
        pid=$(node_pid "$n") || pid=""
        if [[ -n $pid ]] && node_answers "$n"; then
            members=$(running_members "$n" | tr '\n' ' ')
            say "node $n $(name_of "$n") (pid $pid) $(url_of "$n") running; running members: ${members% }"
            up=$((up + 1))
        elif [[ -n $pid ]]; then
            say "node $n $(name_of "$n") (pid $pid) does not answer (starting, or wedged)"
        else
            say "node $n $(name_of "$n") not running"
        fi
    done
    ((up == 3)) && (($(running_members 1 | wc -l) == 3)) && return 0
    ((up == 0)) && return 3
    return 1
}

cmd_urls() {
    local n out=()
    for n in "${NODES[@]}"; do out+=("$(url_of "$n")"); done
    (IFS=,; echo "${out[*]}")
}

cmd_kill() {
    local n pid
    n=$(node_arg "${1:-}")
    pid=$(node_pid "$n") || die "node $n is not running"
    kill -KILL "$pid"
    while is_alive "$pid"; do sleep 0.05; done
    local launcher
    launcher=$(read_pid "$(node_dir "$n")/launcher.pid") || launcher=""
    is_alive "$launcher" && kill -KILL "$launcher" 2>/dev/null
    rm -f -- "$(node_dir "$n")/rabbitmq.pid" "$(node_dir "$n")/launcher.pid"
    say "killed node $n $(name_of "$n") (pid $pid, SIGKILL)"
}

cmd_restart_node() {
    local n t0
    n=$(node_arg "$1")
    ensure_installed
    prepare
    take_lock
    t0=$(now_ms)
    if ! node_pid "$n" >/dev/null; then
        launch "$n"
    fi
    if ! wait_ready "$n" $((t0 + START_TIMEOUT * 1000)); then
        log_tail "$n"
        die "node $n failed to start (logs in $(node_dir "$n")/log)"
    fi
    say "node $n $(name_of "$n") back in $(fmt_secs $(($(now_ms) - t0))): $(url_of "$n")"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    urls | url) cmd_urls ;;
    kill) cmd_kill "${2:-}" ;;
    restart)
        if [[ -n ${2:-} ]]; then
            cmd_restart_node "$2"
        else
            cmd_stop && cmd_start
        fi
        ;;
    ctl)
        [[ -n ${2:-} ]] || die "ctl needs a NODE (1, 2 or 3)"
        n=$(node_arg "$2")
        shift 2
        ctl "$n" "$@"
        ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
