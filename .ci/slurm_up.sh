#!/usr/bin/env bash
# Bring up a real one-node Slurm cluster (munged + slurmctld + slurmd) on this machine, for the
# tests that sbatch the templates in slurm/. Idempotent: when the cluster is already up it says so.
#
# Everything lives under one directory, $DSKD_SLURM_DIR (default /tmp/dskd-slurm):
#   etc/slurm.conf   the cluster config       (point clients at it: export SLURM_CONF=<dir>/etc/slurm.conf)
#   munge/           munge key, socket, log    (the cluster authenticates through this socket only)
#   run/*.pid        daemon PIDs               (.ci/slurm_down.sh stops them by these)
#   log/             slurmctld.log, slurmd.log, jobcomp.txt (finished jobs, a sacct stand-in)
#   state/, spool/   slurmctld state, slurmd spool
#   fake-gpus/       placeholder GPU device files (copies of /dev/null) behind the node's gres
#   env.sh           `source` it to get SLURM_CONF in your shell
# When /etc/slurm/slurm.conf does not exist it is made a symlink to ours, so plain `sinfo` works too.
#
# Knobs (environment):
#   DSKD_SLURM_DIR    where everything goes                      (/tmp/dskd-slurm)
#   DSKD_SLURM_CPUS   CPUs the node advertises; more than the real core count lets a small MLflow
#                     server job run beside a 2-task job on a 2-core CI machine (max(real, 4))
#   DSKD_SLURM_PORT   slurmctld port; slurmd uses the next one    (6817)
#   DSKD_SLURM_FAKE_GPUS  GPUs the node advertises (gres/gpu), so that the templates' GPU request path
#                     (--gpus-per-node) is schedulable here; nothing can compute on them; 0 = none (2)
set -euo pipefail

SLURM_DIR="${DSKD_SLURM_DIR:-/tmp/dskd-slurm}"
CTLD_PORT="${DSKD_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$SLURM_DIR/etc/slurm.conf"
MUNGE_SOCKET="$SLURM_DIR/munge/munge.socket"
export SLURM_CONF="$CONF"

log() { echo "[slurm_up] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() {  # pid_alive NAME -> true when run/NAME.pid names a live process
    local pid_file="$SLURM_DIR/run/$1.pid"
    [[ -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

elapsed_since() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - start }'; }

node_idle() { sinfo --noheader --responding --states=idle,mixed,allocated -o '%T' 2>/dev/null | grep -q .; }

install_packages() {
    local missing=()
    for binary in slurmctld slurmd sinfo munged; do
        command -v "$binary" >/dev/null || missing+=("$binary")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root so apt-get can install them"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then apt-get update -qq; fi
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                 slurmctld slurmd slurm-client munge >/dev/null; }
}

start_munge() {
    pid_alive munged && return
    install -d -m 0755 -o munge -g munge "$SLURM_DIR/munge"
    if [[ ! -s "$SLURM_DIR/munge/munge.key" ]]; then
        runuser -u munge -- mungekey --create --keyfile="$SLURM_DIR/munge/munge.key"
    fi
    # munged refuses world-writable socket dirs and keys it does not own: run it as the munge user.
    runuser -u munge -- /usr/sbin/munged \
        --socket="$MUNGE_SOCKET" --key-file="$SLURM_DIR/munge/munge.key" \
        --pid-file="$SLURM_DIR/munge/munged.pid" --seed-file="$SLURM_DIR/munge/munged.seed" \
        --log-file="$SLURM_DIR/munge/munged.log"
    cp "$SLURM_DIR/munge/munged.pid" "$SLURM_DIR/run/munged.pid"
    munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
        || die "munge does not round-trip; see $SLURM_DIR/munge/munged.log"
}

make_fake_gpus() {  # make_fake_gpus N: sets FAKE_GPUS to how many device files could be made
    # Slurm's gpu gres wants character devices; these are copies of /dev/null (1,3): nothing runs on them.
    FAKE_GPUS=0
    rm -rf "$SLURM_DIR/fake-gpus" && mkdir -p "$SLURM_DIR/fake-gpus"
    for ((i = 0; i < $1; i++)); do
        if ! mknod "$SLURM_DIR/fake-gpus/gpu$i" c 1 3 2>/dev/null; then
            log "mknod not permitted here: the cluster gets no (fake) GPUs"
            FAKE_GPUS=0
            return
        fi
        FAKE_GPUS=$((i + 1))
    done
}

ensure_hostname_resolves() {
    # Jobs use the node name as MASTER_ADDR (as on a real cluster); some containers cannot resolve their own name.
    local host="$1"
    getent hosts "$host" >/dev/null && return
    log "$host does not resolve: adding '127.0.0.1 $host' to /etc/hosts"
    echo "127.0.0.1 $host" >>/etc/hosts
}

write_config() {
    local host node_line real_cpus cpus memory
    host="$(hostname -s)"
    ensure_hostname_resolves "$host"
    node_line="$(slurmd -C | head -1)"                         # NodeName=... CPUs=... RealMemory=...
    real_cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")"
    memory="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
    cpus="${DSKD_SLURM_CPUS:-$(( real_cpus > 4 ? real_cpus : 4 ))}"
    make_fake_gpus "${DSKD_SLURM_FAKE_GPUS:-2}"
    local gres_line="" node_gres=""
    if (( FAKE_GPUS > 0 )); then
        echo "NodeName=$host Name=gpu File=$SLURM_DIR/fake-gpus/gpu[0-$((FAKE_GPUS - 1))]" >"$SLURM_DIR/etc/gres.conf"
        gres_line="GresTypes=gpu"
        node_gres="Gres=gpu:$FAKE_GPUS"
    else
        rm -f "$SLURM_DIR/etc/gres.conf"
    fi
    cat >"$CONF" <<EOF
# Written by .ci/slurm_up.sh: a one-node test cluster. Regenerated on every bring-up.
ClusterName=dskd-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s); short here so tests stay quick.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# config_overrides: trust the CPU count below even when it exceeds the real cores (see DSKD_SLURM_CPUS).
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
# Reject impossible jobs at submission instead of letting them pend forever.
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=3600
KillWait=10
# Start jobs that became eligible (e.g. after a requeue) within a second or two, not a minute.
SchedulerParameters=sched_interval=1,sched_min_interval=100000,bf_interval=1
$gres_line
NodeName=$host NodeAddr=127.0.0.1 $node_gres CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$((memory * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$CONF" >"$SLURM_DIR/env.sh"
    if [[ ! -e /etc/slurm/slurm.conf && -w /etc/slurm ]]; then ln -sfn "$CONF" /etc/slurm/slurm.conf; fi
}

start_daemons() {
    pid_alive slurmctld || slurmctld -f "$CONF"
    pid_alive slurmd || slurmd -f "$CONF"
}

wait_until_idle() {
    local deadline=$((SECONDS + 60))
    until node_idle; do
        if (( SECONDS > deadline )); then
            sinfo -N -l >&2 || true
            tail -n 20 "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmd.log" >&2 || true
            die "the node did not become idle within 60 s (logs above, under $SLURM_DIR/log)"
        fi
        sleep 0.3
    done
}

main() {
    local started
    started=$(date +%s.%N)
    if pid_alive munged && pid_alive slurmctld && pid_alive slurmd && node_idle; then
        log "already up (SLURM_CONF=$CONF)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "run as root: the daemons, munge user and /etc/slurm need it"
    install_packages
    mkdir -p "$SLURM_DIR"/{etc,run,log,state,spool}
    # A half-up cluster from an earlier attempt: stop what is left, then start clean.
    if [[ -n "$(ls -A "$SLURM_DIR/run")" ]]; then bash "$(dirname "$0")/slurm_down.sh" >/dev/null || true; fi
    start_munge
    write_config
    start_daemons
    wait_until_idle
    log "up in $(elapsed_since "$started") s: $(sinfo --noheader -o '%P %D %T, %c CPUs, gres %G')  (SLURM_CONF=$CONF)"
}

main "$@"
