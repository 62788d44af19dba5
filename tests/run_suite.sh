#!/usr/bin/env bash
# `make test`: the whole suite in two phases, so that it stays well under 15 minutes on 2 cores.
#
# 1. Everything not marked `timing`, three pytest processes at once (pytest-xdist, one test file
#    per process at a time, so a module's fleet is started once). Most of these tests wait on
#    worker fleets rather than compute: on 2 cores this phase took 1,007 s one at a time (all
#    tests), 438 s two at a time and 370 s three at a time.
# 2. The tests marked `timing` (they bound how long a recovery, a failover or a workspace's turn
#    takes) one at a time, as they were written, with the machine to themselves.
#
# Extra arguments go to both phases. The exit code is the worse of the two; a phase that
# collects no test (exit code 5, e.g. for a selection of files) does not fail the run unless both do.
set -u
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
WORKERS=${TEST_WORKERS:-3}

"$PYTEST" -m "not timing" -n "$WORKERS" --dist loadfile "$@"
parallel=$?
"$PYTEST" -m "timing" -p no:xdist "$@"
serial=$?

for rc in "$parallel" "$serial"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    exit "$rc"
  fi
done
if [ "$parallel" -eq 5 ] && [ "$serial" -eq 5 ]; then
  exit 5
fi
exit 0
