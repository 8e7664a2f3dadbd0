#!/bin/sh
# Give every close verdict its seeds: run the first command `report.py --close-commands` lists,
# then read the list again (new seeds can settle verdicts or make others close), until every
# command listed has run once in this call. Arguments go to accuracy.py (e.g. --workers 1 --threads 1);
# PYTHON names the interpreter (default: python). Resumable like accuracy.py: rerun after a stop.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
ran=$(mktemp)
trap 'rm -f "$ran"' EXIT
while :; do
    command=$(PYTHONPATH=src:benchmarks "$python" benchmarks/report.py --close-commands | grep -vxFf "$ran" | head -n 1)
    if [ -z "$command" ]; then
        echo "extend_close.sh: every close verdict listed has had its command run"
        exit 0
    fi
    echo "$command" >> "$ran"
    echo "extend_close.sh: $command $*"
    # shellcheck disable=SC2086  # the command's words are split on purpose
    "$python" ${command#python } "$@"
done
