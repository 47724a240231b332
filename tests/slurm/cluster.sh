#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for tests and CI.
#
# Usage: tests/slurm/cluster.sh {install|start|stop|status|env}
#   install  apt-get install munge, slurm (ctld, d, client, dbd) and MariaDB (skipped if present)
#   start    write configs into the state dir and start munged, mariadbd, slurmdbd, slurmctld,
#            slurmd (idempotent); waits until the node is idle
#   stop     stop the daemons started here, in reverse order, and wait for them to exit
#   status   exit 0 if the cluster is up (node idle/mixed/allocated), 1 otherwise
#   env      print `export SLURM_CONF=...` (optional: /etc/slurm/slurm.conf already points there)
#
# Everything (configs, logs, pid files, spool dirs, MariaDB datadir) lives in the state dir
# ${NSDZARR_SLURM_DIR:-/tmp/nsdzarr-slurm}. The only thing written to /etc is the symlink
# /etc/slurm/slurm.conf -> <state dir>/slurm.conf, so clients (sbatch, sacct, srun inside jobs,
# the Snakemake SLURM plugin) work without SLURM_CONF. MariaDB's socket is /run/mysqld/mysqld.sock.
# Needs root, Debian/Ubuntu. Debian bookworm ships slurm-wlm 22.05.
set -euo pipefail

STATE_DIR="${NSDZARR_SLURM_DIR:-/tmp/nsdzarr-slurm}"
CLUSTER_NAME="${NSDZARR_SLURM_CLUSTER:-nsdzarr}"
PARTITION="${NSDZARR_SLURM_PARTITION:-debug}"
WAIT_SECONDS="${NSDZARR_SLURM_WAIT:-60}"

CONF="$STATE_DIR/slurm.conf"
LOG="$STATE_DIR/log"
RUN="$STATE_DIR/run"
DB_DIR="$STATE_DIR/mariadb"
DB_SOCK="/run/mysqld/mysqld.sock" # libmariadb default: slurmdbd has no socket option
MUNGE_SOCK="/run/munge/munge.socket.2" # libmunge default used by all slurm daemons
DB_PASS="nsdzarr-slurm"
export SLURM_CONF="$CONF"

log() { printf '[cluster.sh] %s\n' "$*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

# die with the tail of a log file
die_log() {
    local msg="$1" file="$2"
    log "ERROR: $msg"
    if [[ -f "$file" ]]; then
        log "---- last lines of $file ----"
        tail -n 30 "$file" >&2 || true
    fi
    exit 1
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# wait_for <seconds> <description> <logfile> <command...>
wait_for() {
    local secs="$1" what="$2" logfile="$3"
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die_log "timed out after ${secs}s waiting for $what" "$logfile"
        sleep 0.5
    done
}

pidfile() { # pidfile <daemon>
    case "$1" in
    munged) echo "$RUN/munge/munged.pid" ;;
    mariadbd) echo "$RUN/mysql/mariadbd.pid" ;;
    *) echo "$RUN/$1.pid" ;;
    esac
}

# proc_alive <pid> <name>: a live (not zombie) process with that command name
proc_alive() {
    local stat
    [[ "$1" =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # /proc/PID/stat: "PID (comm) STATE ..."; a killed daemon can linger as a zombie
    [[ "$stat" == "$1 ($2) "* && "$stat" != "$1 ($2) Z"* ]]
}

pid_alive() { # pid_alive <daemon>: its pid file names a live process of that name
    local f
    f=$(pidfile "$1")
    [[ -s "$f" ]] && proc_alive "$(<"$f")" "$1"
}

# ---------------------------------------------------------------------------------------------
cmd_install() {
    need_root
    local missing=0 b
    for b in munged slurmctld slurmd sbatch sacct slurmdbd mariadbd mariadb-install-db; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    [[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so ]] ||
        compgen -G '/usr/lib/*/slurm-wlm/accounting_storage_mysql.so' >/dev/null || missing=1
    if ((missing == 0)); then
        log "install: all binaries present, skipping"
        return 0
    fi
    apt-get update
    # --no-install-recommends: the recommended slurm-wlm-plugins pulls ~20 unneeded -dev packages
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        munge slurmctld slurmd slurm-client slurmdbd mariadb-server
}

# ---------------------------------------------------------------------------------------------
write_configs() {
    mkdir -p "$LOG" "$RUN" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    local host node_line real_mem mem_cg
    host=$(hostname -s)
    node_line=$(slurmd -C 2>/dev/null | head -n 1)
    [[ "$node_line" == NodeName=* ]] || die "slurmd -C gave no node line: $node_line"
    real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    # leave ~5% (at least 512 MB) for the daemons and the OS
    local reserve=$((real_mem / 20 > 512 ? real_mem / 20 : 512))
    node_line="${node_line/RealMemory=$real_mem/RealMemory=$((real_mem - reserve))}"

    cat >"$CONF" <<EOF
# written by tests/slurm/cluster.sh
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
# slurmd/slurmdbd bind 127.0.0.1 only (slurmctld 22.05 still binds 0.0.0.0:6817)
CommunicationParameters=NoInAddrAny
ReturnToService=2
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    # cgroup.conf is looked up next to slurm.conf
    {
        echo "# written by tests/slurm/cluster.sh"
        if [[ -d /sys/fs/cgroup/memory ]]; then
            echo "CgroupPlugin=cgroup/v1"
        else
            echo "CgroupPlugin=cgroup/v2"
        fi
        echo "ConstrainCores=yes"
        echo "ConstrainRAMSpace=yes"
        # no swap escape hatch, if the kernel accounts swap (v1: memory.memsw.*)
        mem_cg=/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes
        if [[ ! -d /sys/fs/cgroup/memory || -e "$mem_cg" ]]; then
            echo "ConstrainSwapSpace=yes"
            echo "AllowedSwapSpace=0"
        fi
    } >"$STATE_DIR/cgroup.conf"

    link_etc_conf

    # slurmdbd.conf is looked up next to slurm.conf and must be mode 600, owned by SlurmUser
    (
        umask 077
        cat >"$STATE_DIR/slurmdbd.conf" <<EOF
# written by tests/slurm/cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
CommunicationParameters=NoInAddrAny
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$STATE_DIR/slurmdbd.conf"
}

# Clients must find slurm.conf without SLURM_CONF: the Snakemake jobstep plugin strips every
# SLURM_* variable (SLURM_CONF included) before its nested `srun`, which then falls back to
# /etc/slurm/slurm.conf (or DNS SRV) and fails. So /etc/slurm/slurm.conf is a symlink to ours.
link_etc_conf() {
    local etc=/etc/slurm/slurm.conf
    if [[ -e "$etc" && ! -L "$etc" ]] && ! grep -q 'written by tests/slurm/cluster.sh' "$etc"; then
        die "$etc exists and was not written by this script; move it away first"
    fi
    mkdir -p /etc/slurm
    ln -sfn "$CONF" "$etc"
}

# ---------------------------------------------------------------------------------------------
munge_ok() { munge -n -S "$MUNGE_SOCK" </dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null; }

start_munge() {
    if munge_ok 2>/dev/null; then
        # ours (pid file in state dir) or a system munged: either way usable
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (is munge installed?)"
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 "$RUN/munge" # munged writes its pid file as user munge
    rm -f "$RUN/munge/munged.pid"
    touch "$LOG/munged.log" && chown munge:munge "$LOG/munged.log"
    runuser -u munge -- munged --force --pid-file="$RUN/munge/munged.pid" --log-file="$LOG/munged.log" ||
        die_log "munged failed to start" "$LOG/munged.log"
    wait_for "$WAIT_SECONDS" munged "$LOG/munged.log" munge_ok
}

db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping; }

start_mariadb() {
    if pid_alive mariadbd && db_ok >/dev/null 2>&1; then return 0; fi
    if [[ -S "$DB_SOCK" ]] && db_ok >/dev/null 2>&1; then
        die "another MariaDB already listens on $DB_SOCK; stop it first"
    fi
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [[ ! -d "$DB_DIR/mysql" ]]; then
        install -d -o mysql -g mysql -m 0750 "$DB_DIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 ||
            die_log "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    touch "$LOG/mariadbd.log" && chown mysql:mysql "$LOG/mariadbd.log"
    install -d -o mysql -g mysql -m 0755 "$RUN/mysql"
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCK" \
        --pid-file="$RUN/mysql/mariadbd.pid" --log-error="$LOG/mariadbd.log" --skip-networking \
        --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_for "$WAIT_SECONDS" mariadbd "$LOG/mariadbd.log" db_ok
    mariadb --no-defaults --socket="$DB_SOCK" -uroot <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

dbd_ok() { sacctmgr -n -P show cluster format=cluster; }

start_slurmdbd() {
    if pid_alive slurmdbd && dbd_ok >/dev/null 2>&1; then return 0; fi
    slurmdbd || die_log "slurmdbd failed to start" "$LOG/slurmdbd.log"
    wait_for "$WAIT_SECONDS" slurmdbd "$LOG/slurmdbd.log" dbd_ok
    if ! dbd_ok 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null ||
            die_log "sacctmgr add cluster failed" "$LOG/slurmdbd.log"
    fi
}

ctld_ok() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
    if pid_alive slurmctld && ctld_ok 2>/dev/null; then return 0; fi
    slurmctld -f "$CONF" || die_log "slurmctld failed to start" "$LOG/slurmctld.log"
    wait_for "$WAIT_SECONDS" slurmctld "$LOG/slurmctld.log" ctld_ok
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

node_up() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_slurmd() {
    if ! pid_alive slurmd; then
        slurmd -f "$CONF" || die_log "slurmd failed to start" "$LOG/slurmd.log"
    fi
    local deadline=$((SECONDS + WAIT_SECONDS))
    until node_up; do
        if [[ "$(node_state)" =~ ^(down|drained|draining) ]]; then
            scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        fi
        ((SECONDS < deadline)) ||
            die_log "timed out after ${WAIT_SECONDS}s waiting for the node to be idle (state: $(node_state))" \
                "$LOG/slurmd.log"
        sleep 0.5
    done
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "slurm not installed; run: $0 install"
    mkdir -p "$STATE_DIR"
    if all_pids_alive && node_up; then
        link_etc_conf
        log "already running"
    else
        write_configs
        start_munge
        start_mariadb
        start_slurmdbd
        start_slurmctld
        start_slurmd
        log "cluster up: $(sinfo -h -N -o '%N %T cpus=%c mem=%m' | head -n 1)"
    fi
}

# ---------------------------------------------------------------------------------------------
all_pids_alive() {
    local d
    for d in mariadbd slurmdbd slurmctld slurmd; do
        pid_alive "$d" || return 1
    done
    munge_ok 2>/dev/null
}

stop_one() { # stop_one <name>
    local pidfile pid deadline
    pidfile=$(pidfile "$1")
    pid_alive "$1" || {
        rm -f "$pidfile"
        return 0
    }
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + WAIT_SECONDS))
    while proc_alive "$pid" "$1"; do
        if ((SECONDS >= deadline)); then
            log "$1 (pid $pid) did not exit after ${WAIT_SECONDS}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    log "stopped $1"
}

cmd_stop() {
    need_root
    local d
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_one "$d"
    done
}

cmd_status() {
    if all_pids_alive && node_up; then
        echo "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%m' | head -n 1) (SLURM_CONF=$CONF)"
        return 0
    fi
    local d s=""
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if pid_alive "$d"; then s+=" $d=running"; else s+=" $d=stopped"; fi
    done
    echo "down:$s"
    return 1
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac
