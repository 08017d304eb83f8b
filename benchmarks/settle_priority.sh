#!/usr/bin/env bash
# Does a first run's background settle slow down the user's next command? A steady-state index of
# FOLDER, alone, then while another model home's first-run settle works in the background: with the
# settle as it is ("after": nice 19 and its session's autogroup at 19), and with its autogroup put
# back to 0 by hand ("before": nice 19 alone, as before 2026-11-30). Linux only (/proc/PID/autogroup).
#   benchmarks/settle_priority.sh MODEL_DIR FOLDER SETTLED_HOME [ROUNDS]
# SETTLED_HOME: a CLIPSEARCH_HOME where MODEL_DIR has settled already (its steady state).
set -euo pipefail
model=$1 folder=$2 settled=$3 rounds=${4:-2}
py=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
steady() {
    rm -rf "$work"/steady.db*
    CLIPSEARCH_HOME=$settled /usr/bin/time -f "%e s wall, %P CPU" \
        "$py" -m clipsearch --db "$work/steady.db" index "$folder" --model "$model" --json 2>&1 >/dev/null | tail -1
}
wait_settles() { while pgrep -f "clipsearch.(settle|quantise)" >/dev/null; do sleep 1; done; }
for round in $(seq "$rounds"); do
    for variant in alone after before; do
        wait_settles
        if [ "$variant" != alone ]; then
            rm -rf "$work/home" "$work"/first.db*
            CLIPSEARCH_HOME=$work/home "$py" -m clipsearch --db "$work/first.db" index "$folder" --model "$model" --json >/dev/null 2>&1
            sleep 1
            pid=$(pgrep -f "clipsearch.settle" | head -1)
            [ "$variant" = before ] && echo 0 >"/proc/$pid/autogroup"
            echo -n "round $round, settle in the background, $variant ($(cat "/proc/$pid/autogroup")): "
        else
            echo -n "round $round, alone: "
        fi
        steady
    done
done
wait_settles
