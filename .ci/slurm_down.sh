#!/usr/bin/env bash
# Stop the one-node Slurm cluster that .ci/slurm_up.sh started, by the PIDs it recorded:
# cancel every job first (stopping slurmd alone leaves job processes running), then slurmd,
# slurmctld and munged. Safe to run when nothing is up. Keeps the logs; `--purge` removes the
# whole $DSKD_SLURM_DIR.
set -uo pipefail

SLURM_DIR="${DSKD_SLURM_DIR:-/tmp/dskd-slurm}"
export SLURM_CONF="$SLURM_DIR/etc/slurm.conf"

log() { echo "[slurm_down] $*" >&2; }

stop_by_pid_file() {  # stop_by_pid_file NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid_file="$SLURM_DIR/run/$1.pid" pid
    [[ -s "$pid_file" ]] || return 0
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then log "$1 ($pid) ignored SIGTERM; killing"; kill -KILL "$pid"; fi
        log "stopped $1 ($pid)"
    fi
    rm -f "$pid_file"
}

cancel_all_jobs() {
    [[ -s "$SLURM_DIR/run/slurmctld.pid" && -f "$SLURM_CONF" ]] || return 0
    command -v scancel >/dev/null || return 0
    [[ -n "$(squeue --noheader -o %i 2>/dev/null)" ]] || return 0
    scancel --full --quiet --user="$(id -un)" 2>/dev/null
    scancel --quiet --state=PENDING 2>/dev/null
    for _ in $(seq 150); do
        [[ -z "$(squeue --noheader -o %i 2>/dev/null)" ]] && return 0
        sleep 0.2
    done
    log "jobs still listed after 30 s: $(squeue --noheader -o '%i %T' | tr '\n' ' ')"
}

cancel_all_jobs
stop_by_pid_file slurmd
stop_by_pid_file slurmctld
stop_by_pid_file munged
rm -f "$SLURM_DIR/munge/munged.pid"
# Forget job state so the next bring-up starts with an empty queue and job ids from 1.
rm -rf "$SLURM_DIR/state"
if [[ "${1:-}" == "--purge" ]]; then
    [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$SLURM_CONF" ]] \
        && rm -f /etc/slurm/slurm.conf
    rm -rf "$SLURM_DIR"
    log "purged $SLURM_DIR"
fi
