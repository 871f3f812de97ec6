#!/usr/bin/env bash
# deploy/broker.sh - the project's own local RabbitMQ node.
#
# Usage: deploy/broker.sh start|stop|restart|status|wait|url|ctl ARGS...
#
# Runs a private RabbitMQ node (default name amqptasks@localhost) whose
# config, data (mnesia), logs, pid file and Erlang cookie all live in
# <project>/.amqptasks/broker/. It listens on 127.0.0.1 only. See
# deploy/README.md for details and the docker-compose alternative.
#
# Environment:
#   AMQPTASKS_BROKER_URL            if set, start/stop do nothing (an external
#                                   broker is in use)
#   AMQPTASKS_BROKER_PORT           AMQP port (default 5672)
#   AMQPTASKS_MGMT_PORT             management UI/API port (default 15672)
#   AMQPTASKS_DIST_PORT             Erlang distribution port
#                                   (default AMQP port + 20000)
#   AMQPTASKS_BROKER_NODENAME       node name (default amqptasks@localhost)
#   AMQPTASKS_BROKER_START_TIMEOUT  seconds to wait for start-up (default 90)
#   AMQPTASKS_BROKER_LOG_LEVEL      node log level (default warning)
#
# Exit status of `status`: 0 running, 3 not running, 1 a node process exists
# but does not answer (still booting, or wedged).

set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(dirname -- "$SCRIPT_DIR")
STATE_DIR="$ROOT/.amqptasks"
BROKER_DIR="$STATE_DIR/broker"
LOG_DIR="$BROKER_DIR/log"
PID_FILE="$BROKER_DIR/rabbitmq.pid"
LAUNCHER_PID_FILE="$BROKER_DIR/launcher.pid"
CONF_FILE="$BROKER_DIR/rabbitmq.conf"
PLUGINS_FILE="$BROKER_DIR/enabled_plugins"
ENV_CONF_FILE="$BROKER_DIR/rabbitmq-env.conf"
STARTUP_LOG="$LOG_DIR/startup.log"

# Real RabbitMQ scripts (the /usr/sbin wrappers hard-code /var/lib/rabbitmq
# and redirect output to /var/log/rabbitmq).
RMQ_BIN=/usr/lib/rabbitmq/bin

AMQP_PORT=${AMQPTASKS_BROKER_PORT:-5672}
MGMT_PORT=${AMQPTASKS_MGMT_PORT:-15672}
NODENAME=${AMQPTASKS_BROKER_NODENAME:-amqptasks@localhost}
START_TIMEOUT=${AMQPTASKS_BROKER_START_TIMEOUT:-90}
LOG_LEVEL=${AMQPTASKS_BROKER_LOG_LEVEL:-warning}
STOP_TIMEOUT=60

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat <<EOF
Usage: $PROG start|stop|restart|status|wait|url|ctl ARGS...

  start    start the local RabbitMQ node (no-op if already running)
  stop     stop it and wait until it is gone (no-op if not running)
  restart  stop, then start
  status   one-line status; exit 0 running, 3 not running, 1 not answering
  wait     wait until the running node is fully up (AMQP + management API)
  url      print the AMQP URL of the local broker
  ctl      run rabbitmqctl against the local node, e.g.
           $PROG ctl list_queues -p / name messages
EOF
}

is_port() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= 65535)); }

is_port "$AMQP_PORT" || die "AMQPTASKS_BROKER_PORT='$AMQP_PORT' is not a valid port"
is_port "$MGMT_PORT" || die "AMQPTASKS_MGMT_PORT='$MGMT_PORT' is not a valid port"
DIST_PORT=${AMQPTASKS_DIST_PORT:-$((AMQP_PORT + 20000))}
is_port "$DIST_PORT" || die "distribution port '$DIST_PORT' is not valid; set AMQPTASKS_DIST_PORT"
# Port range used by the short-lived rabbitmqctl/diagnostics processes.
CTL_DIST_PORT_MIN=$((DIST_PORT + 10000))
((CTL_DIST_PORT_MIN + 10 <= 65535)) || CTL_DIST_PORT_MIN=35672
[[ $START_TIMEOUT =~ ^[0-9]+$ ]] || die "AMQPTASKS_BROKER_START_TIMEOUT must be a number of seconds"
[[ $NODENAME == *@* ]] || NODENAME="$NODENAME@localhost"

LOCAL_URL="amqp://guest:guest@localhost:$AMQP_PORT/%2F"
MGMT_URL="http://127.0.0.1:$MGMT_PORT/"

# --- helpers ----------------------------------------------------------------

now_ms() {
    local t=${EPOCHREALTIME:-}
    if [[ -n $t ]]; then
        t=${t//[.,]/}
        echo $((10#$t / 1000))
    else
        echo $(($(date +%s) * 1000))
    fi
}

fmt_secs() { # milliseconds -> "12.3s"
    printf '%d.%01ds' $(($1 / 1000)) $((($1 % 1000) / 100))
}

installed() { [[ -x $RMQ_BIN/rabbitmq-server && -x $RMQ_BIN/rabbitmqctl ]]; }

ensure_installed() {
    installed && return 0
    if ((EUID == 0)) && command -v apt-get >/dev/null 2>&1; then
        say "rabbitmq-server is not installed; installing it with apt-get ..."
        apt-get update -qq || warn "apt-get update failed; trying the install anyway"
        # The package's postinst may try to start the system-wide service;
        # inside containers that is refused, which is harmless.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server \
            || die "apt-get install rabbitmq-server failed"
        installed || die "rabbitmq-server was installed but $RMQ_BIN/rabbitmq-server is missing"
        return 0
    fi
    die "RabbitMQ is not installed ($RMQ_BIN/rabbitmq-server not found).
  Install it, e.g. on Debian/Ubuntu:  sudo apt-get install rabbitmq-server
  (or run this script as root and it will install it), or use another broker:
  docker compose up -d rabbitmq, then export AMQPTASKS_BROKER_URL=amqp://guest:guest@localhost:5672/%2F"
}

# Decide which user runs the node and the CLI tools. As root, with a
# `rabbitmq` system user present, everything runs as that user.
RUN_AS_USER=""
resolve_user() {
    RUN_AS_USER=""
    if ((EUID == 0)) && id -u rabbitmq >/dev/null 2>&1; then
        RUN_AS_USER=rabbitmq
    fi
}

# Build the environment for the RabbitMQ scripts. env -i keeps the caller's
# RABBITMQ_* / ERL_* variables (and /etc/rabbitmq/rabbitmq-env.conf) out.
build_env() {
    BROKER_ENV=(
        PATH=/usr/sbin:/usr/bin:/sbin:/bin
        LANG=C.UTF-8
        LC_ALL=C.UTF-8
        HOME="$BROKER_DIR"
        RABBITMQ_NODENAME="$NODENAME"
        RABBITMQ_USE_LONGNAME=false
        RABBITMQ_CONF_ENV_FILE="$ENV_CONF_FILE"
        RABBITMQ_CONFIG_FILE="$CONF_FILE"
        RABBITMQ_ADVANCED_CONFIG_FILE="$BROKER_DIR/advanced.config"
        RABBITMQ_ENABLED_PLUGINS_FILE="$PLUGINS_FILE"
        RABBITMQ_MNESIA_BASE="$BROKER_DIR/mnesia"
        RABBITMQ_LOG_BASE="$LOG_DIR"
        RABBITMQ_PID_FILE="$PID_FILE"
        ERL_CRASH_DUMP="$LOG_DIR/erl_crash.dump"
        RABBITMQ_DIST_PORT="$DIST_PORT"
        RABBITMQ_CTL_DIST_PORT_MIN="$CTL_DIST_PORT_MIN"
        RABBITMQ_CTL_DIST_PORT_MAX="$((CTL_DIST_PORT_MIN + 10))"
        # Erlang distribution and an epmd we start only listen on loopback.
        ERL_EPMD_ADDRESS=127.0.0.1
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
        "RABBITMQ_CTL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
    )
    [[ -n ${ERL_EPMD_PORT:-} ]] && BROKER_ENV+=(ERL_EPMD_PORT="$ERL_EPMD_PORT")
    [[ -n ${TERM:-} ]] && BROKER_ENV+=(TERM="$TERM")
    return 0
}

# Command prefix: switch to the broker user (if any) and set the environment.
broker_prefix() {
    BROKER_CMD=()
    if [[ -n $RUN_AS_USER ]]; then
        if command -v setpriv >/dev/null 2>&1; then
            BROKER_CMD=(setpriv --reuid="$RUN_AS_USER" --regid="$RUN_AS_USER" --init-groups --)
        else
            BROKER_CMD=(runuser -u "$RUN_AS_USER" --)
        fi
    fi
    BROKER_CMD+=(env -i "${BROKER_ENV[@]}")
}

# Run a command as the broker user with the broker environment. Erlang wants
# a readable working directory, so leave one the broker user cannot read.
as_broker() {
    broker_prefix
    if [[ -n $RUN_AS_USER ]] && ! "${BROKER_CMD[@]}" test -r . -a -x . 2>/dev/null; then
        (cd -- "$BROKER_DIR" && "${BROKER_CMD[@]}" "$@")
    else
        "${BROKER_CMD[@]}" "$@"
    fi
}

ctl() { as_broker "$RMQ_BIN/rabbitmqctl" "$@"; }
diag() { as_broker "$RMQ_BIN/rabbitmq-diagnostics" "$@"; }

# Create the broker dir, the Erlang cookie, and hand it to the broker user.
prepare_dir() {
    if [[ ! -d $BROKER_DIR ]]; then
        (umask 022 && mkdir -p -- "$BROKER_DIR") || die "cannot create $BROKER_DIR"
        chmod 0750 -- "$BROKER_DIR"
    fi
    mkdir -p -- "$LOG_DIR" 2>/dev/null || true
    if ((EUID != 0)) && [[ ! -w $BROKER_DIR || ! -O $BROKER_DIR ]]; then
        die "$BROKER_DIR belongs to another user (was the broker run as root?); run this as root, or remove that directory"
    fi
    local cookie="$BROKER_DIR/.erlang.cookie"
    if [[ ! -s $cookie ]]; then
        # Pre-create the cookie so the node and the CLI tools cannot race.
        local letters=ABCDEFGHIJKLMNOPQRSTUVWXYZ b value=""
        for b in $(od -An -N32 -tu1 /dev/urandom); do
            value+=${letters:b%26:1}
        done
        (umask 077 && printf '%s' "$value" >"$cookie")
        chmod 0400 -- "$cookie"
    fi
    if [[ -n $RUN_AS_USER ]]; then
        chown -R -- "$RUN_AS_USER:" "$BROKER_DIR" || die "cannot chown $BROKER_DIR to $RUN_AS_USER"
        if ! as_broker test -w "$BROKER_DIR" -a -r "$cookie"; then
            warn "user $RUN_AS_USER cannot reach $BROKER_DIR (a parent directory is not searchable); running the node as root instead"
            RUN_AS_USER=""
        fi
    fi
}

# Only for read-only commands: is the dir usable by us at all?
check_dir_access() {
    if [[ -d $BROKER_DIR ]] && ((EUID != 0)) && [[ ! -O $BROKER_DIR ]]; then
        die "$BROKER_DIR belongs to another user (the broker was started as root); run this as root"
    fi
    if [[ -n $RUN_AS_USER && -d $BROKER_DIR ]] && ! as_broker test -r "$BROKER_DIR/.erlang.cookie"; then
        RUN_AS_USER=""
    fi
}

write_config() {
    cat >"$CONF_FILE" <<EOF
# Generated by deploy/broker.sh on every start - edit the script, not this file.
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
log.console = false
log.file.level = $LOG_LEVEL
EOF
    echo '[rabbitmq_management].' >"$PLUGINS_FILE"
    echo '# Generated by deploy/broker.sh; keeps /etc/rabbitmq/rabbitmq-env.conf out.' >"$ENV_CONF_FILE"
    if [[ -n $RUN_AS_USER ]]; then
        chown -- "$RUN_AS_USER:" "$CONF_FILE" "$PLUGINS_FILE" "$ENV_CONF_FILE"
    fi
}

# Is pid a live beam (Erlang VM) process?
is_beam() {
    local pid=$1 comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    is_alive "$pid" || return 1
    comm=$(ps -p "$pid" -o comm= 2>/dev/null) || return 1
    [[ $comm == beam* ]]
}

# Is pid a live process? (zombies count as dead: without a reaping init
# the exited launcher shell may linger as one)
is_alive() {
    local stat
    [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
    stat=$(ps -p "$1" -o stat= 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}

read_pid() { [[ -r $1 ]] && head -c 32 -- "$1" 2>/dev/null | tr -dc '0-9'; }

# Print the pid of our node's VM, if one is alive.
node_pid() {
    local pid
    pid=$(read_pid "$PID_FILE") || return 1
    is_beam "$pid" || return 1
    echo "$pid"
}

node_answers() { diag -q ping -t 10 >/dev/null 2>&1; }

# AMQP port the running node was started with (from its generated config).
running_port() {
    local line
    line=$(grep -m1 '^listeners.tcp.1' "$CONF_FILE" 2>/dev/null) || return 1
    echo "${line##*:}"
}

# Refuse to report an already-running node as usable on other ports.
check_running_port() {
    local port
    port=$(running_port) || return 0
    if [[ $port != "$AMQP_PORT" ]]; then
        die "the local broker is already running on port $port, not $AMQP_PORT (AMQPTASKS_BROKER_PORT); stop it first"
    fi
}

# Serialise start/stop (e.g. parallel test workers all calling `start`).
take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>>"$BROKER_DIR/.lock"
    flock -w 180 9 || die "timed out waiting for another $PROG run (lock $BROKER_DIR/.lock)"
}

port_open() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

log_tail() {
    local f=$STARTUP_LOG
    if [[ -s $f ]]; then
        if grep -q '\[error\]' "$f"; then
            echo "----- first errors in $f -----" >&2
            grep -m 12 '\[error\]' "$f" >&2
        fi
        echo "----- last lines of $f -----" >&2
        tail -n 15 -- "$f" >&2
    fi
    f="$LOG_DIR/$NODENAME.log"
    if [[ -s $f ]]; then
        echo "----- last lines of $f -----" >&2
        tail -n 15 -- "$f" >&2
    fi
}

mgmt_answers() {
    local url="http://127.0.0.1:$MGMT_PORT/api/overview"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 -u guest:guest "$url" 2>/dev/null
    elif command -v python3 >/dev/null 2>&1; then
        python3 - "$url" <<'EOF' >/dev/null 2>&1
import base64, sys, urllib.request
req = urllib.request.Request(sys.argv[1])
req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
urllib.request.urlopen(req, timeout=5).read()
EOF
    else
        return 0 # nothing to check with
    fi
}

# Wait until the node is fully up: AMQP port, boot complete, management API.
# $1 = deadline (ms), $2 = launcher pid to watch (optional)
wait_ready() {
    local deadline=$1 launcher=${2:-} left
    while ! port_open "$AMQP_PORT"; do
        if [[ -n $launcher ]] && ! is_alive "$launcher"; then
            echo "the node exited during start-up" >&2
            return 1
        fi
        (($(now_ms) < deadline)) || { echo "timed out waiting for port $AMQP_PORT" >&2; return 1; }
        sleep 0.5
    done
    left=$(((deadline - $(now_ms)) / 1000))
    ((left >= 5)) || left=5
    if ! ctl -q await_startup -t "$left" >/dev/null 2>&1; then
        echo "rabbitmqctl await_startup failed" >&2
        return 1
    fi
    until mgmt_answers; do
        (($(now_ms) < deadline)) || { echo "timed out waiting for the management API on port $MGMT_PORT" >&2; return 1; }
        sleep 0.5
    done
}

# --- commands ---------------------------------------------------------------

cmd_url() { echo "$LOCAL_URL"; }

cmd_start() {
    if [[ -n ${AMQPTASKS_BROKER_URL:-} ]]; then
        say "AMQPTASKS_BROKER_URL is set; using that broker, not starting a local one"
        return 0
    fi
    ensure_installed
    resolve_user
    build_env
    prepare_dir
    take_lock

    local pid
    if pid=$(node_pid); then
        check_running_port
        if node_answers; then
            say "already running: $NODENAME (pid $pid) $LOCAL_URL"
            return 0
        fi
        say "node process $pid exists but is not answering yet; waiting for it"
        wait_ready $(($(now_ms) + START_TIMEOUT * 1000)) \
            || { log_tail; die "node (pid $pid) is not answering; try: $PROG stop"; }
        say "running: $NODENAME (pid $pid) $LOCAL_URL"
        return 0
    fi

    # Refuse to start on top of something else (e.g. the system-wide
    # rabbitmq-server service, or a docker container on the same ports).
    local p what
    for p in "$AMQP_PORT" "$MGMT_PORT" "$DIST_PORT"; do
        if port_open "$p"; then
            if node_answers; then
                check_running_port
                say "already running: $NODENAME $LOCAL_URL (pid file missing)"
                return 0
            fi
            case $p in
                "$AMQP_PORT") what="AMQP port (AMQPTASKS_BROKER_PORT)" ;;
                "$MGMT_PORT") what="management port (AMQPTASKS_MGMT_PORT)" ;;
                *) what="Erlang distribution port (AMQPTASKS_DIST_PORT)" ;;
            esac
            die "port $p on 127.0.0.1 is already in use by another process; it is the $what.
  Another RabbitMQ (the system service 'rabbitmq-server', a docker container,
  or another checkout) is probably running. Stop it (e.g. 'service rabbitmq-server stop'),
  choose other ports, or point AMQPTASKS_BROKER_URL at it."
        fi
    done

    write_config
    rm -f -- "$PID_FILE" "$LAUNCHER_PID_FILE"

    local t0 launcher
    t0=$(now_ms)
    say "starting $NODENAME on 127.0.0.1:$AMQP_PORT (management $MGMT_PORT, dist $DIST_PORT)${RUN_AS_USER:+ as user $RUN_AS_USER} ..."
    # New session, so the node survives the calling shell/terminal.
    broker_prefix
    (
        exec 9>&- # the node must not hold our lock
        cd -- "$BROKER_DIR"
        exec setsid -w "${BROKER_CMD[@]}" "$RMQ_BIN/rabbitmq-server"
    ) </dev/null >"$STARTUP_LOG" 2>&1 &
    launcher=$!
    echo "$launcher" >"$LAUNCHER_PID_FILE"

    if ! wait_ready $((t0 + START_TIMEOUT * 1000)) "$launcher"; then
        log_tail
        die "RabbitMQ failed to start (logs in $LOG_DIR); '$PROG stop' cleans up a half-started node"
    fi
    pid=$(node_pid) || pid='?'
    say "started $NODENAME (pid $pid) in $(fmt_secs $(($(now_ms) - t0))): $LOCAL_URL, management $MGMT_URL"
}

cmd_stop() {
    if [[ -n ${AMQPTASKS_BROKER_URL:-} ]]; then
        say "AMQPTASKS_BROKER_URL is set; not stopping anything"
        return 0
    fi
    if ! installed || [[ ! -d $BROKER_DIR ]]; then
        say "not running"
        return 0
    fi
    resolve_user
    build_env
    check_dir_access
    [[ -w $BROKER_DIR ]] && take_lock

    local pid launcher t0
    pid=$(node_pid) || pid=""
    launcher=$(read_pid "$LAUNCHER_PID_FILE") || launcher=""
    if [[ -z $pid ]] && ! is_alive "$launcher" && ! port_open "$AMQP_PORT"; then
        rm -f -- "$PID_FILE" "$LAUNCHER_PID_FILE"
        say "not running"
        return 0
    fi
    if [[ -z $pid ]] && ! is_alive "$launcher" && ! node_answers; then
        rm -f -- "$PID_FILE" "$LAUNCHER_PID_FILE"
        say "not running (port $AMQP_PORT is used by something else)"
        return 0
    fi

    t0=$(now_ms)
    say "stopping $NODENAME${pid:+ (pid $pid)} ..."
    ctl -q shutdown -t "$STOP_TIMEOUT" >/dev/null 2>&1 || true

    # rabbitmqctl shutdown normally waits for the VM to exit; if it did not
    # (wedged node), escalate to SIGTERM, then SIGKILL.
    local deadline=$((t0 + STOP_TIMEOUT * 1000)) sig
    local -a signals=(TERM KILL)
    while is_beam "$pid" || is_alive "$launcher"; do
        if (($(now_ms) >= deadline)); then
            ((${#signals[@]})) || die "could not stop the node (pid ${pid:-$launcher})"
            sig=${signals[0]}
            signals=("${signals[@]:1}")
            warn "node did not stop; sending SIG$sig"
            is_beam "$pid" && kill -s "$sig" "$pid" 2>/dev/null
            is_alive "$launcher" && kill -s "$sig" "$launcher" 2>/dev/null
            deadline=$(($(now_ms) + 15000))
        fi
        sleep 0.3
    done
    rm -f -- "$PID_FILE" "$LAUNCHER_PID_FILE"
    say "stopped in $(fmt_secs $(($(now_ms) - t0)))"
}

cmd_status() {
    if ! installed; then
        say "not running (rabbitmq-server is not installed)"
        return 3
    fi
    if [[ ! -d $BROKER_DIR ]]; then
        say "not running"
        return 3
    fi
    resolve_user
    build_env
    check_dir_access
    local pid
    pid=$(node_pid) || pid=""
    if node_answers; then
        local port
        port=$(running_port) || port=$AMQP_PORT
        say "running: $NODENAME${pid:+ (pid $pid)} amqp://guest:guest@localhost:$port/%2F"
        return 0
    fi
    if [[ -n $pid ]]; then
        say "node process $pid exists but does not answer (starting up, or wedged)"
        return 1
    fi
    say "not running"
    return 3
}

cmd_wait() {
    installed || die "RabbitMQ is not installed"
    resolve_user
    build_env
    check_dir_access
    local t0 pid
    t0=$(now_ms)
    if ! wait_ready $((t0 + START_TIMEOUT * 1000)); then
        die "the local broker is not up"
    fi
    pid=$(node_pid) || pid='?'
    say "up: $NODENAME (pid $pid) $LOCAL_URL (waited $(fmt_secs $(($(now_ms) - t0))))"
}

cmd_ctl() {
    installed || die "RabbitMQ is not installed"
    [[ -d $BROKER_DIR ]] || die "the local broker has never been started ($PROG start)"
    resolve_user
    build_env
    check_dir_access
    ctl "$@"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop && cmd_start ;;
    status) cmd_status ;;
    wait) cmd_wait ;;
    url) cmd_url ;;
    ctl) shift; cmd_ctl "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
