# slurm/common.sh: what every dskd template shares. Sourced by the templates, never run or edited.
#
# Outside a job (`bash slurm/<template>.sbatch ARGS`):
#   dskd_submit TEMPLATE ARGS...    sbatch TEMPLATE with options built from the template's settings
# Inside a job:
#   dskd_setup_distributed          MASTER_ADDR/MASTER_PORT from the allocation, OMP/NCCL environment
#   dskd_run_ranks CMD...           one rank per Slurm task (srun); SIGUSR1 near the time limit ->
#                                   ranks checkpoint and exit 75 -> the job requeues itself, and the next
#                                   run continues with --resume auto
# shellcheck shell=bash

DSKD_EXIT_REQUEUE=75   # dskd's "checkpointed, requeue me" exit code

dskd_log() { echo "[dskd-slurm $(date '+%F %T')] $*" >&2; }

dskd_submit() {
    local template="$1"; shift
    local options=(
        --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
        --cpus-per-task="$CPUS_PER_TASK" --time="$TIME_LIMIT" --signal="B:USR1@$SIGNAL_LEAD_S"
        --requeue --open-mode=append --output="$LOG_DIR/%x-%j.out"
    )
    (( GPUS_PER_NODE > 0 )) && options+=(--gpus-per-node="$GPUS_PER_NODE")
    [[ -n "${PARTITION:-}" ]] && options+=(--partition="$PARTITION")
    [[ -n "${ACCOUNT:-}" ]] && options+=(--account="$ACCOUNT")
    # Word splitting is wanted here: EXTRA_SBATCH_ARGS holds several options, e.g. "--qos=high --exclusive".
    # shellcheck disable=SC2206
    options+=(${EXTRA_SBATCH_ARGS:-})
    mkdir -p "$LOG_DIR"
    # The job runs a spooled copy of the template: tell it where common.sh is, and what to run.
    DSKD_SLURM_HOME="$(cd "$(dirname "$template")" && pwd)"
    export DSKD_SLURM_HOME DSKD_COMMAND MAX_REQUEUES
    sbatch "${options[@]}" "$template" "$@"
}

dskd_setup_distributed() {
    local nodes
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    # Always derived from this allocation: values inherited from the submitting shell would be wrong.
    export MASTER_ADDR="${nodes[0]}"
    # Below Linux's ephemeral range (32768+), different for jobs sharing a node.
    export MASTER_PORT="${DSKD_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
    export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
    if [[ "${SLURM_GPUS_ON_NODE:-0}" == 0 ]]; then
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"   # CPU ranks talk over gloo
    else
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=1          # a dead rank fails the job instead of hanging it
        export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
        # Multi-homed nodes: pin NCCL to the fast fabric, e.g. export NCCL_SOCKET_IFNAME=ib0 before submitting.
    fi
    dskd_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${#nodes[@]} node(s) ${nodes[*]}," \
        "${SLURM_NTASKS:-1} rank(s), master $MASTER_ADDR:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS"
}

dskd_run_ranks() {
    local step_pid rc=0 got_term=0
    # Bash runs traps only between commands, so the step runs in the background and we wait for it.
    # srun forwards SIGUSR1 to every rank; it takes SIGTERM as "terminate the step", so never send it that.
    trap 'dskd_log "SIGUSR1: asking the ranks to checkpoint"; kill -USR1 "$step_pid" 2>/dev/null || true' USR1
    trap 'got_term=1; dskd_log "SIGTERM: asking the ranks to checkpoint"; kill -USR1 "$step_pid" 2>/dev/null || true' TERM
    # Exit 75 is a "bad exit" to srun: --kill-on-bad-exit=0 so it cannot cut off ranks still saving.
    # shellcheck disable=SC2016  # $SLURM_* expand in each task, not here
    srun --kill-on-bad-exit=0 bash -c \
        'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
        dskd-rank "$@" &
    step_pid=$!
    while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid" || true; done
    wait "$step_pid" || rc=$?
    trap - USR1 TERM

    if (( rc != DSKD_EXIT_REQUEUE )); then
        dskd_log "ranks exited with $rc"
        return "$rc"
    fi
    if (( got_term )); then
        # Cancelled or preempted: Slurm decides whether this job comes back, not us.
        dskd_log "checkpointed after SIGTERM; leaving the requeue decision to Slurm"
        return "$rc"
    fi
    if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
        dskd_log "checkpointed, but this job was already requeued $MAX_REQUEUES times (MAX_REQUEUES); stopping"
        return "$rc"
    fi
    dskd_log "checkpointed; requeueing job $SLURM_JOB_ID, it resumes from the checkpoint"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        dskd_log "Slurm refused the requeue (submitted with --no-requeue, or JobRequeue=0 on this cluster):" \
            "submit the same command again to resume from the checkpoint"
        return "$rc"
    fi
}
