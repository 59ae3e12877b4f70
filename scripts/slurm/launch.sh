# Sourced by the job scripts in this folder (docs/launch.md); not a job script itself.
#
# beitv2_run ARGS...  runs `python -m engine.main ARGS` as one srun task per GPU (each task finds its rank, world
# size and master address in SLURM's variables: engine/launch_env.py), passes the preemption signal this batch shell
# receives (`#SBATCH --signal=B:$SIGNAL@...`) on to every rank, and returns the ranks' exit status: 0 done, 143
# stopped with a checkpoint (requeued when REQUEUE=true and the job was not cancelled), 2 a one-line error.
#
# Settings (set them before sourcing, or in the environment):
#   PYTHON             the interpreter with beitv2-ds installed (default: .venv/bin/python of this checkout)
#   SIGNAL             the signal named in `#SBATCH --signal=B:...` (USR1, USR2 or TERM); TERM always checkpoints too
#   REQUEUE            true: after a signal (or the time limit) rank 0 runs `scontrol requeue` (needs --requeue)
#   STOP_BEFORE_END_S  > 0: checkpoint and stop this many seconds before SLURM_JOB_END_TIME (a second safety net)
#   SRUN_ARGS          more srun options (e.g. --cpu-bind=none)

if [ ! -f engine/main.py ]; then
  echo "error: run the job from the repository root (cd there before sbatch; SLURM_SUBMIT_DIR=$PWD)" >&2
  exit 2
fi

PYTHON=${PYTHON:-.venv/bin/python}
SIGNAL=${SIGNAL:-USR1}
REQUEUE=${REQUEUE:-true}
STOP_BEFORE_END_S=${STOP_BEFORE_END_S:-0}
SRUN_ARGS=${SRUN_ARGS:-}
export PYTHONUNBUFFERED=1
# Each rank's numbers come from SLURM's variables; stale ones from the submitting shell would be checked against
# them (a one-line error), so they are not passed on. MASTER_ADDR / MASTER_PORT, when set, override SLURM's.
unset RANK WORLD_SIZE LOCAL_RANK

beitv2_run() {
  # --kill-on-bad-exit: a rank that fails takes the others down instead of leaving them waiting in a collective.
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 $SRUN_ARGS "$PYTHON" -m engine.main "$@" \
    --run.preempt_signal="$SIGNAL" --run.requeue="$REQUEUE" --run.stop_before_end_s="$STOP_BEFORE_END_S" &
  local pid=$! rc
  # The signal reaches this shell only (B:): srun passes it on to every task.
  # shellcheck disable=SC2064
  trap "echo \"\$(date +%T) SIG$SIGNAL: every rank checkpoints the same step and stops\" >&2; kill -$SIGNAL $pid" \
    "$SIGNAL"
  while :; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break   # `wait` also returns when the trapped signal arrives: wait on
  done
  trap - "$SIGNAL"
  return "$rc"
}
