#!/usr/bin/env bash
# Submit launch/slurm/train.sbatch, follow its log until the job ends, and say where the results are.
#   launch/slurm/submit.sh [sbatch options ...] -- [--config FILE] [section.key=value ...]
# Exit code: 0 when the job COMPLETED, 1 otherwise. Used by `make slurm-submit`.
set -euo pipefail
cd "$(dirname "$0")/../.."
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sbatch_args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
command -v sbatch >/dev/null || { echo "submit: no sbatch here; run 'make slurm-up' first" >&2; exit 1; }

job=$(sbatch --parsable "${sbatch_args[@]}" launch/slurm/train.sbatch "$@")
job=${job%%;*}
log=$(scontrol show job "$job" -o | grep -o 'StdOut=[^ ]*' | cut -d= -f2)
echo "submit: job $job submitted; log: $log"

# Poll scontrol every 2 s (sbatch --wait backs off up to 32 s); show the log as it grows.
shown=0
state=PENDING
while :; do
  fields=$(scontrol show job "$job" -o 2>/dev/null || true)
  state=$(grep -o 'JobState=[A-Z_]*' <<<"$fields" | cut -d= -f2)
  if [ -f "$log" ]; then
    total=$(wc -l <"$log")
    if [ "$total" -gt "$shown" ]; then tail -n +"$((shown + 1))" "$log" | head -n "$((total - shown))"; shown=$total; fi
  fi
  case "$state" in
    COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|"") break ;;
  esac
  sleep 2
done
exit_code=$(grep -o 'ExitCode=[0-9:]*' <<<"$fields" | cut -d= -f2)
echo "submit: job $job ended $state (exit code ${exit_code:-?}); log: $log"
run_dir=$(grep -o 'run directory: .*' "$log" | tail -n1 | cut -d' ' -f3- || true)
[ -n "$run_dir" ] && echo "submit: run directory: $run_dir; checkpoints: $run_dir/checkpoints/ (best.pt, last.pt)"
[ "$state" = COMPLETED ]
