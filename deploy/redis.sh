#!/usr/bin/env bash
# deploy/redis.sh - the project's own local Redis (the shared result store).
#
# Usage: deploy/redis.sh start|stop|restart|status|url|cli ARGS...
#
# Runs a private redis-server whose config, data (append-only file), log and
# pid file live in <project>/.amqptasks/redis/. It listens on 127.0.0.1 only,
# keeps no RDB snapshots and writes an append-only file (fsync once a second),
# so results survive a restart of this Redis. See deploy/README.md.
#
# Environment:
#   AMQPTASKS_REDIS_URL            if set, start/stop do nothing (an external
#                                  Redis is in use); `url` prints it and `cli`
#                                  talks to it
#   AMQPTASKS_REDIS_PORT           TCP port (default 6379)
#   AMQPTASKS_REDIS_START_TIMEOUT  seconds to wait for PING to answer (default 30)
#
# Exit status of `status`: 0 running, 3 not running, 1 a server process exists
# but does not answer.

set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(dirname -- "$SCRIPT_DIR")
STATE_DIR="$ROOT/.amqptasks"
REDIS_DIR="$STATE_DIR/redis"
CONF_FILE="$REDIS_DIR/redis.conf"
PID_FILE="$REDIS_DIR/redis.pid"
LOG_FILE="$REDIS_DIR/redis.log"
STARTUP_LOG="$REDIS_DIR/startup.log"

PORT=${AMQPTASKS_REDIS_PORT:-6379}
START_TIMEOUT=${AMQPTASKS_REDIS_START_TIMEOUT:-30}
STOP_TIMEOUT=30

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat <<EOF
Usage: $PROG start|stop|restart|status|url|cli ARGS...

  start    start the local Redis (no-op if already running)
  stop     stop it and wait until it is gone (no-op if not running)
  restart  stop, then start
  status   one-line status; exit 0 running, 3 not running, 1 not answering
  url      print the Redis URL (AMQPTASKS_REDIS_URL if set, else the local one)
  cli      run redis-cli against it, e.g.  $PROG cli keys 'amqptasks:*'
EOF
}

if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
    die "AMQPTASKS_REDIS_PORT='$PORT' is not a valid port"
fi
[[ $START_TIMEOUT =~ ^[0-9]+$ ]] || die "AMQPTASKS_REDIS_START_TIMEOUT must be a number of seconds"

LOCAL_URL="redis://127.0.0.1:$PORT/0"

# --- internals -------------------------------------------------------------

SERVER=""
CLI=""
find_tools() {
    SERVER=$(command -v redis-server 2>/dev/null || true)
    CLI=$(command -v redis-cli 2>/dev/null || true)
    [[ -n $SERVER && -n $CLI ]]
}

ensure_installed() {
    find_tools && return 0
    if ((EUID == 0)) && command -v apt-get >/dev/null 2>&1; then
        say "redis-server is not installed; installing it with apt-get ..."
        apt-get update -qq || warn "apt-get update failed; trying the install anyway"
        # The package's postinst may start the system-wide service (on 6379, like us);
        # inside containers that is refused. If it did start, `start` says so below.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
            || die "apt-get install redis-server failed"
        find_tools || die "redis-server was installed but redis-server/redis-cli are not on PATH"
        return 0
    fi
    die "Redis is not installed (redis-server / redis-cli not found).
  Install it, e.g. on Debian/Ubuntu:  sudo apt-get install redis-server
  (or run this script as root and it will install it), or use another Redis:
  docker compose up -d redis, then export AMQPTASKS_REDIS_URL=redis://127.0.0.1:6379/0"
}

now_ms() {
    local t=${EPOCHREALTIME:-}
    if [[ -n $t ]]; then
        t=${t//[.,]/}
        echo $((10#$t / 1000))
    else
        echo $(($(date +%s) * 1000))
    fi
}

is_alive() { # a live (non-zombie) process?
    local stat
    [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
    stat=$(ps -p "$1" -o stat= 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}

# Print the pid of our redis-server, if one is alive.
server_pid() {
    local pid comm
    [[ -r $PID_FILE ]] || return 1
    pid=$(head -c 32 -- "$PID_FILE" 2>/dev/null | tr -dc '0-9')
    is_alive "$pid" || return 1
    comm=$(ps -p "$pid" -o comm= 2>/dev/null) || return 1
    [[ $comm == redis-server* ]] || return 1
    echo "$pid"
}

answers() { # PING on our port answers PONG
    [[ -n $CLI ]] || find_tools || return 1
    [[ $(timeout 5 "$CLI" -h 127.0.0.1 -p "$PORT" ping 2>/dev/null) == PONG ]]
}

# The port the running server was started with (from its generated config).
running_port() {
    local line
    line=$(grep -m1 '^port ' "$CONF_FILE" 2>/dev/null) || return 1
    echo "${line#port }"
}

port_open() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>>"$REDIS_DIR/.lock"
    flock -w 60 9 || die "timed out waiting for another $PROG run (lock $REDIS_DIR/.lock)"
}

prepare_dir() {
    if [[ ! -d $REDIS_DIR ]]; then
        (umask 077 && mkdir -p -- "$REDIS_DIR") || die "cannot create $REDIS_DIR"
    fi
    if [[ ! -w $REDIS_DIR || ! -O $REDIS_DIR ]] && ((EUID != 0)); then
        die "$REDIS_DIR belongs to another user (was Redis run as root?); run this as root, or remove that directory"
    fi
}

write_config() {
    # Quoted values: the project path may contain spaces.
    cat >"$CONF_FILE" <<EOF
# Generated by deploy/redis.sh on every start - edit the script, not this file.
bind 127.0.0.1
protected-mode yes
port $PORT
daemonize yes
pidfile "$PID_FILE"
logfile "$LOG_FILE"
loglevel notice
dir "$REDIS_DIR"
# Results should survive a restart of this Redis: an append-only file, fsync'd once a
# second; no RDB snapshots.
save ""
appendonly yes
appendfsync everysec
EOF
}

log_tail() {
    local f
    for f in "$STARTUP_LOG" "$LOG_FILE"; do
        if [[ -s $f ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 15 -- "$f" >&2
        fi
    done
}

# --- commands ---------------------------------------------------------------

cmd_url() { echo "${AMQPTASKS_REDIS_URL:-$LOCAL_URL}"; }

cmd_start() {
    if [[ -n ${AMQPTASKS_REDIS_URL:-} ]]; then
        say "AMQPTASKS_REDIS_URL is set; using that Redis, not starting a local one"
        return 0
    fi
    ensure_installed
    prepare_dir
    take_lock

    local pid running
    if pid=$(server_pid); then
        running=$(running_port) || running=$PORT
        if [[ $running != "$PORT" ]]; then
            die "the local Redis is already running on port $running, not $PORT (AMQPTASKS_REDIS_PORT); stop it first"
        fi
        if answers; then
            say "already running: redis-server (pid $pid) $LOCAL_URL"
            return 0
        fi
        die "redis-server (pid $pid) is running but does not answer PING on port $PORT; try: $PROG stop"
    fi
    if port_open "$PORT"; then
        die "port $PORT on 127.0.0.1 is already in use by another process.
  Another Redis (the system service 'redis-server', a docker container, or another
  checkout) is probably running. Stop it (e.g. 'service redis-server stop'), choose
  another AMQPTASKS_REDIS_PORT, or point AMQPTASKS_REDIS_URL at it."
    fi

    write_config
    rm -f -- "$PID_FILE"
    local t0 deadline
    t0=$(now_ms)
    deadline=$((t0 + START_TIMEOUT * 1000))
    say "starting redis-server on 127.0.0.1:$PORT (data in $REDIS_DIR) ..."
    # daemonize: the server forks into the background and survives the calling shell.
    if ! (exec 9>&- && cd -- "$REDIS_DIR" && exec "$SERVER" "$CONF_FILE") </dev/null >"$STARTUP_LOG" 2>&1; then
        log_tail
        die "redis-server failed to start (log in $LOG_FILE)"
    fi
    until answers; do
        if (($(now_ms) >= deadline)); then
            log_tail
            die "redis-server did not answer PING within ${START_TIMEOUT}s (log in $LOG_FILE); '$PROG stop' cleans up"
        fi
        sleep 0.1
    done
    pid=$(server_pid) || pid='?'
    say "started redis-server (pid $pid) in $(($(now_ms) - t0)) ms: $LOCAL_URL"
}

cmd_stop() {
    if [[ -n ${AMQPTASKS_REDIS_URL:-} ]]; then
        say "AMQPTASKS_REDIS_URL is set; not stopping anything"
        return 0
    fi
    if [[ ! -d $REDIS_DIR ]]; then
        say "not running"
        return 0
    fi
    [[ -w $REDIS_DIR ]] && take_lock
    local pid
    if ! pid=$(server_pid); then
        rm -f -- "$PID_FILE"
        say "not running"
        return 0
    fi
    local t0
    t0=$(now_ms)
    say "stopping redis-server (pid $pid) ..."
    # SHUTDOWN flushes the append-only file; SIGTERM does the same if the CLI cannot talk.
    find_tools || true
    local port
    port=$(running_port) || port=$PORT
    if [[ -z $CLI ]] || ! timeout 10 "$CLI" -h 127.0.0.1 -p "$port" shutdown >/dev/null 2>&1; then
        kill -s TERM "$pid" 2>/dev/null || true
    fi
    local deadline=$((t0 + STOP_TIMEOUT * 1000))
    while is_alive "$pid"; do
        if (($(now_ms) >= deadline)); then
            warn "redis-server did not stop; sending SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            deadline=$(($(now_ms) + 10000))
        fi
        sleep 0.1
    done
    rm -f -- "$PID_FILE"
    say "stopped in $(($(now_ms) - t0)) ms"
}

cmd_status() {
    if [[ -n ${AMQPTASKS_REDIS_URL:-} ]]; then
        say "AMQPTASKS_REDIS_URL is set: an external Redis is in use"
    fi
    find_tools || { say "not running (redis-server is not installed)"; return 3; }
    local pid
    pid=$(server_pid) || pid=""
    if [[ -n $pid ]] && answers; then
        say "running: redis-server (pid $pid) $LOCAL_URL"
        return 0
    fi
    if [[ -n $pid ]]; then
        say "redis-server process $pid exists but does not answer on port $PORT"
        return 1
    fi
    say "not running"
    return 3
}

cmd_cli() {
    find_tools || die "redis-cli is not installed ($PROG start installs it when run as root)"
    if [[ -n ${AMQPTASKS_REDIS_URL:-} ]]; then
        exec "$CLI" -u "$AMQPTASKS_REDIS_URL" "$@"
    fi
    exec "$CLI" -h 127.0.0.1 -p "$PORT" "$@"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop && cmd_start ;;
    status) cmd_status ;;
    url) cmd_url ;;
    cli) shift; cmd_cli "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
