#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, with accounting, for trying the launchers and for CI.
#
#   launch/local_slurm.sh start     install (Debian/Ubuntu, as root) and start; idempotent
#   launch/local_slurm.sh status    which daemons run, and sinfo
#   launch/local_slurm.sh stop      end the daemons this script started (by pid file), nothing else
#   launch/local_slurm.sh env       print the export line for the SLURM client commands
#
# State, logs and configuration live in $ENAT_SLURM_DIR (default: $TMPDIR/enat-slurm). The client
# commands (sbatch, squeue, sacct, srun) find the configuration through SLURM_CONF: run
# `eval "$(launch/local_slurm.sh env)"` first. Daemons: munged, mariadbd (on 127.0.0.1:$ENAT_SLURM_DB_PORT,
# its data under the state directory), slurmdbd (accounting: submitit reads job states through
# sacct, without it a job that dies leaves job.result() waiting forever), slurmctld and slurmd.
set -euo pipefail

STATE=${ENAT_SLURM_DIR:-${TMPDIR:-/tmp}/enat-slurm}
DB_PORT=${ENAT_SLURM_DB_PORT:-3317}
CTLD_PORT=${ENAT_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${ENAT_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${ENAT_SLURM_DBD_PORT:-6819}
CLUSTER=enat-local
CONF=$STATE/etc/slurm.conf
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"

log() { echo "[local_slurm] $*" >&2; }
die() { echo "[local_slurm] error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE -> 0 when the pid file names a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local n=$1 what=$2; shift 2
    for ((i = 0; i < n * 4; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    die "$what did not come up within ${n}s; see the logs in $STATE/log and $STATE/mariadb-run"
}

install_packages() {
    local missing=()
    for b in slurmctld slurmd slurmdbd sbatch munged mariadbd; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing+=("$b")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM ($PACKAGES) yourself"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    log "installing $PACKAGES (missing: ${missing[*]})"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $PACKAGES >/dev/null
}

write_configs() {
    mkdir -p "$STATE"/{etc,log,run,ctld,spool}
    local cpus mem_mb
    cpus=$(nproc)
    # Announcing more memory than the node has drains it: leave 1 GiB to the system.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat >"$CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        return 0  # someone's munged: use it, and leave it alone on stop
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing: reinstall munge or run mungekey"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/run/munged.started"
    wait_for 10 munged munge -n
}

start_mariadb() {
    alive "$STATE/run/mariadb.pid" && return 0
    local data=$STATE/mysql
    if [[ ! -d $data/mysql ]]; then
        mkdir -p "$data" && chown mysql:mysql "$data"
        mariadb-install-db --user=mysql --datadir="$data" --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed: $STATE/log/mariadb-install.log"
    fi
    # mariadbd runs as mysql: its socket, pid and log go to a folder that user owns.
    mkdir -p "$STATE/mariadb-run"
    chown -R mysql:mysql "$data" "$STATE/mariadb-run"
    (mariadbd --user=mysql --datadir="$data" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --socket="$STATE/mariadb-run/mariadb.sock" --pid-file="$STATE/mariadb-run/mariadb.pid" \
        --log-error="$STATE/mariadb-run/mariadb.log" --innodb-buffer-pool-size=64M >/dev/null 2>&1 &)
    wait_for 60 mariadb mariadb --socket="$STATE/mariadb-run/mariadb.sock" -e "select 1"
    cp "$STATE/mariadb-run/mariadb.pid" "$STATE/run/mariadb.pid"
    mariadb --socket="$STATE/mariadb-run/mariadb.sock" <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm() {
    export SLURM_CONF=$CONF
    if ! alive "$STATE/run/slurmdbd.pid"; then
        /usr/sbin/slurmdbd
        wait_for 60 slurmdbd sacctmgr -n list cluster
    fi
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    if ! alive "$STATE/run/slurmctld.pid"; then
        /usr/sbin/slurmctld -i -f "$CONF"
        wait_for 30 slurmctld scontrol ping
    fi
    if ! alive "$STATE/run/slurmd.pid"; then
        /usr/sbin/slurmd -N localhost -f "$CONF"
    fi
    wait_for 60 "the node (sinfo says $(sinfo -h -o %T 2>/dev/null || echo nothing))" \
        bash -c "sinfo -h -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

cmd_start() {
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "up: $(SLURM_CONF=$CONF sinfo -h -o '%P %D %c CPUs %m MB %T')"
    log "client commands need: export SLURM_CONF=$CONF"
}

cmd_stop() {
    local f
    for d in slurmd slurmctld slurmdbd mariadb; do
        f=$STATE/run/$d.pid
        if alive "$f"; then
            kill "$(cat "$f")"
            for ((i = 0; i < 80; i++)); do alive "$f" || break; sleep 0.25; done
            alive "$f" && kill -9 "$(cat "$f" 2>/dev/null)" 2>/dev/null
            log "stopped $d"
        fi
    done
    f=$STATE/run/munged.started
    if alive "$f"; then kill "$(cat "$f")"; log "stopped munged"; fi
    rm -f "$f"
}

cmd_status() {
    local rc=0
    for d in munged.started slurmdbd mariadb slurmctld slurmd; do
        local f=$STATE/run/${d%.pid}; [[ $d == *.started ]] || f=$f.pid
        if alive "$f"; then echo "${d%.started}: running (pid $(cat "$f"))"; else echo "${d%.started}: not running"; rc=1; fi
    done
    SLURM_CONF=$CONF sinfo 2>/dev/null || rc=1
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state in $STATE)" >&2; exit 2 ;;
esac
