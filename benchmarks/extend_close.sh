#!/bin/sh
# Give every close verdict its seeds: run the first (cheapest) command `report.py --close-commands` lists,
# then read the list again (new seeds can settle verdicts or make others close), until every
# command listed has run once in this call. Arguments go to accuracy.py (e.g. --workers 1 --threads 1);
# PYTHON names the interpreter (default: python). Resumable like accuracy.py: rerun after a stop.
# A command that ends unfinished (a failed seed, or a row another process is training) does not
# stop the others; the call then exits 1.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
ran=$(mktemp)
trap 'rm -f "$ran"' EXIT
unfinished=0
while :; do
    command=$(PYTHONPATH=src:benchmarks "$python" benchmarks/report.py --close-commands | grep -vxFf "$ran" | head -n 1)
    if [ -z "$command" ]; then
        echo "extend_close.sh: every close verdict listed has had its command run"
        exit "$unfinished"
    fi
    echo "$command" >> "$ran"
    echo "extend_close.sh: $command $*"
    # shellcheck disable=SC2086  # the command's words are split on purpose
    "$python" ${command#python } "$@" || {
        echo "extend_close.sh: exit status $? (left unfinished), going on"
        unfinished=1
    }
done
