# Sourced by the job scripts in this folder (docs/launch.md); not a job script itself.
#
# beitv2_run ARGS...  runs `python -m engine.main ARGS` as one srun task per GPU (each task finds its rank, world
# size and master address in SLURM's variables: engine/parallel/launch_env.py), passes the preemption signal this batch shell
# receives (`#SBATCH --signal=B:$SIGNAL@...`) on to every rank, and returns the ranks' exit status: 0 done, 143
# stopped with a checkpoint (requeued when REQUEUE=true and the job was not cancelled), 2 a one-line error.
#
# Settings (set them before sourcing, or in the environment):
#   PYTHON             the interpreter with beitv2-ds installed (default: .venv/bin/python of this checkout)
#   SIGNAL             the signal named in `#SBATCH --signal=B:...` (USR1, USR2 or TERM); TERM always checkpoints too
#   REQUEUE            true: after a signal (or the time limit) rank 0 runs `scontrol requeue` (needs --requeue)
#   STOP_BEFORE_END_S  > 0: checkpoint and stop this many seconds before SLURM_JOB_END_TIME (a second safety net)
#   SRUN_ARGS          more srun options (e.g. --cpu-bind=none)
#   LAUNCHER           srun (default): srun starts the ranks; deepspeed: DeepSpeed's own SLURM runner
#                      (`deepspeed --launcher slurm`) does, from a hostfile of this job's nodes

if [ ! -f engine/main.py ]; then
  echo "error: run the job from the repository root (cd there before sbatch; SLURM_SUBMIT_DIR=$PWD)" >&2
  exit 2
fi

PYTHON=${PYTHON:-.venv/bin/python}
SIGNAL=${SIGNAL:-USR1}
REQUEUE=${REQUEUE:-true}
STOP_BEFORE_END_S=${STOP_BEFORE_END_S:-0}
SRUN_ARGS=${SRUN_ARGS:-}
LAUNCHER=${LAUNCHER:-srun}
export PYTHONUNBUFFERED=1
# Each rank's numbers come from SLURM's variables; stale ones from the submitting shell would be checked against
# them (a one-line error), so they are not passed on. MASTER_ADDR / MASTER_PORT, when set, override SLURM's.
unset RANK WORLD_SIZE LOCAL_RANK

beitv2_run() {
  local pid rc forward
  if [ "$LAUNCHER" = deepspeed ]; then
    # DeepSpeed's runner takes a script, not a module (its srun line has no -m): the console script of $PYTHON's
    # environment. It needs a hostfile of the job's nodes, and --master_addr so that it asks no node over ssh.
    local hostfile="${TMPDIR:-/tmp}/beitv2-hostfile-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))/" \
      > "$hostfile"
    # shellcheck disable=SC2086
    "$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --force_multi --no_ssh_check \
      --master_addr "$(head -n 1 "$hostfile" | cut -d' ' -f1)" --launcher slurm \
      --launcher_args "--kill-on-bad-exit=1 $SRUN_ARGS" "$(dirname "$PYTHON")/beitv2" "$@" \
      --run.preempt_signal="$SIGNAL" --run.requeue="$REQUEUE" --run.stop_before_end_s="$STOP_BEFORE_END_S" &
    pid=$!
    # The runner does not pass signals on: SLURM sends it to the tasks of the job's steps (not this shell).
    forward="scancel --signal=$SIGNAL $SLURM_JOB_ID"
  else
    # --kill-on-bad-exit: a rank that fails takes the others down instead of leaving them waiting in a collective.
    # shellcheck disable=SC2086
    srun --kill-on-bad-exit=1 $SRUN_ARGS "$PYTHON" -m engine.main "$@" \
      --run.preempt_signal="$SIGNAL" --run.requeue="$REQUEUE" --run.stop_before_end_s="$STOP_BEFORE_END_S" &
    pid=$!
    forward="kill -$SIGNAL $pid"   # srun passes it on to every task
  fi
  # The signal reaches this shell only (B:); it is handed on to every rank.
  # shellcheck disable=SC2064
  trap "echo \"\$(date +%T) SIG$SIGNAL: every rank checkpoints the same step and stops\" >&2; $forward" "$SIGNAL"
  while :; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break   # `wait` also returns when the trapped signal arrives: wait on
  done
  trap - "$SIGNAL"
  return "$rc"
}
