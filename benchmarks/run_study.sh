#!/usr/bin/env bash
# Run a study benchmark and keep its leaderboard with the command, the machine and the date.
#
#   benchmarks/run_study.sh SPEC.yaml [--data-root DIR] [--name NAME]
#
# Results go to benchmarks/results/<NAME or spec file name>-<UTC date>/: report.{json,md,png} and
# every child's summary, plus command.txt, machine.txt, spec.yaml and run.log. --data-root is
# prepended to ICD_DATA_ROOTS, against which the spec's relative COCO paths are resolved
# (e.g. --data-root ../shared/data for benchmarks/coco128_study.yaml). Rerunning the same command on the
# same day resumes the folder (finished children are not run again).
set -euo pipefail

usage() { echo "usage: $0 SPEC.yaml [--data-root DIR] [--name NAME]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
spec=$1; shift
[[ -f $spec ]] || { echo "no such spec: $spec" >&2; exit 2; }
name=$(basename "$spec" .yaml)
while [[ $# -gt 0 ]]; do
  case $1 in
    --data-root) [[ $# -ge 2 ]] || usage; ICD_DATA_ROOTS="$(cd "$2" && pwd)${ICD_DATA_ROOTS:+:$ICD_DATA_ROOTS}"; shift 2 ;;
    --name) [[ $# -ge 2 ]] || usage; name=$2; shift 2 ;;
    *) usage ;;
  esac
done
export ICD_DATA_ROOTS="${ICD_DATA_ROOTS:-}"

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3
out="benchmarks/results/${name}-$(date -u +%Y-%m-%d)"
mkdir -p "$out"

# `icd study` on the PATH or in the venv; the package entry point otherwise (same command).
if command -v icd >/dev/null 2>&1 && icd study --help >/dev/null 2>&1; then
  cmd=(icd study "$spec" --output "$out")
elif [[ -x $repo/.venv/bin/icd ]] && "$repo/.venv/bin/icd" study --help >/dev/null 2>&1; then
  cmd=("$repo/.venv/bin/icd" study "$spec" --output "$out")
else
  cmd=("$python" -m icd_cli study "$spec" --output "$out")
fi

cp "$spec" "$out/spec.yaml"
{
  echo "ICD_DATA_ROOTS=${ICD_DATA_ROOTS} ${cmd[*]}"
  echo "git: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
} > "$out/command.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "uname: $(uname -a)"
  echo "cores: $(nproc --all)"
  echo "OMP_NUM_THREADS: ${OMP_NUM_THREADS:-unset (torch picks)}"
  "$python" - <<'PY'
import torch
print(f"torch: {torch.__version__}")
if torch.cuda.is_available():
    print(f"device: cuda {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)")
else:
    print("device: cpu")
PY
} > "$out/machine.txt"
cat "$out/machine.txt"
echo "running: ${cmd[*]}"

start=$(date +%s)
set +e
"${cmd[@]}" 2>&1 | tee -a "$out/run.log"
status=${PIPESTATUS[0]}
set -e
echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ), exit $status, $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
exit "$status"
