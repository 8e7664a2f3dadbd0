#!/bin/sh
# One worker of the whole accuracy grid: every cell accuracy.py runs by default, in its order, then
# the extra seeds of every close verdict (extend_close.sh). Start one worker per core, e.g.
#   for i in 1 2; do PYTHON=.venv/bin/python nohup benchmarks/grid.sh > benchmarks/work/grid_$i.log 2>&1 & sleep 20; done
# Workers share the cells row by row: a method another worker is training is skipped. Resumable:
# start the workers again after a stop (after carry.py restore on a fresh checkout). Arguments go
# to accuracy.py (default: --workers 1 --threads 1); PYTHON names the interpreter (default: python).
# Exits 1 when something was left unfinished (a failed seed, or rows another worker was training).
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
[ $# -gt 0 ] || set -- --workers 1 --threads 1
unfinished=0
echo "grid.sh: accuracy.py $*"
"$python" benchmarks/accuracy.py "$@" || unfinished=1
PYTHON=$python benchmarks/extend_close.sh "$@" || unfinished=1
exit "$unfinished"
