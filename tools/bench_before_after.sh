#!/usr/bin/env bash
# Side-by-side benchmark of two builds in one run on one GPU, for changes that should not slow
# anything down: `xqagen bench` of a base tree and of this tree, alternated twice (base, head, base,
# head) so that drift of the GPU shows as a difference between the two rounds.
# A change to the templates alone is timed in one process with tools/template_ab.py.
#   [ROUNDS=2] bash tools/bench_before_after.sh BASE_TREE RESULTS_DIR [xqagen bench options]
# BASE_TREE: an unpacked source tree of the base revision (e.g. `git archive REV | tar -x -C DIR`);
# Each tree is imported from its folder, its emitters/ mapped to xqagen.emitters by a link (what
# `pip install -e .` does with setuptools' package-dir), so neither needs installing.
set -euo pipefail
base=$(realpath "$1"); results=$2; shift 2
head=$(realpath "$(dirname "$0")/..")
mkdir -p "$results"
for tree in "$base" "$head"; do [ -e "$tree/xqagen/emitters" ] || ln -s ../emitters "$tree/xqagen/emitters"; done
for round in $(seq "${ROUNDS:-2}"); do
  for side in base head; do
    tree=$base; [ "$side" = head ] && tree=$head
    echo "== $side, round $round: $(cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" python3 -c \
      'import xqagen.emitters; print(xqagen.emitters.__file__)')"
    (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" python3 -m xqagen.bench --no-flashinfer \
      --json "$results/bench-$side-$round.jsonl" "$@") | tail -n +3
  done
done
