# `lanes FN_A FN_B` (sourced by scripts/demo.sh): run two shell functions side by side, each with half of $CORES
# (FN_A gets CORES/2, FN_B the rest, in their own $CORES), or one after the other when $NPROC > 1 or $CORES < 2.
# Exits 1 once both have ended if either failed. On INT or TERM both lanes' processes get TERM (a training run saves a
# checkpoint first) and nothing outside them does: each lane runs in its own process group, so a rerun resumes
# instead of racing an orphaned run over the same files (background jobs of a script would otherwise ignore Ctrl-C).
lanes() {
  if [ "${NPROC:-1}" -gt 1 ] || [ "$CORES" -lt 2 ]; then "$1"; "$2"; return; fi
  local half=$((CORES / 2)) a b failed=0
  set -m
  (CORES=$half; "$1") & a=$!
  (CORES=$((CORES - half)); "$2") & b=$!
  set +m
  trap 'trap - INT TERM; kill -TERM -- "-$a" "-$b" 2>/dev/null; exit 130' INT TERM
  wait "$a" || failed=1
  wait "$b" || failed=1
  trap - INT TERM
  [ "$failed" -eq 0 ] || { echo "lanes: a step failed (its log's end is above)"; exit 1; }
}
