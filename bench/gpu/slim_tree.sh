#!/usr/bin/env bash
# Runs HERE, around a session's device calls: a `run` call carries the working tree and its carry paths,
# 64 MiB in all, and the committed results (37 MB on 2026-12-07, most of it earlier studies' stores) no
# longer leave room for a 34 MiB wheel part. The machine needs none of them but the study it resumes.
#
#   bash bench/gpu/slim_tree.sh out bench/results/<study folder>
#       moves every other folder of bench/results/ to ../.hold-results/ (outside the repository), and the
#       study folder's product-answers.tgz (merge_study.sh: records the machine never reads) with them
#   bash bench/gpu/slim_tree.sh back
#       puts them back; run it before every commit (`git status` shows them deleted until then)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
HOLD=../.hold-results

case "${1:-}" in
  out)
    keep=${2:?usage: slim_tree.sh out bench/results/<study folder>}
    [ -d "$keep" ] || { echo "slim_tree: no folder $keep" >&2; exit 2; }
    mkdir -p "$HOLD"
    for entry in bench/results/*; do
      [ "$entry" = "${keep%/}" ] && continue
      [ -e "$HOLD/${entry#bench/results/}" ] && { echo "slim_tree: $HOLD already holds ${entry#bench/results/}; run back first" >&2; exit 2; }
      mv "$entry" "$HOLD/"
    done
    if [ -f "$keep/product-answers.tgz" ]; then
      mkdir -p "$HOLD/.kept" && mv "$keep/product-answers.tgz" "$HOLD/.kept/"
      echo "${keep%/}" > "$HOLD/.kept/folder"
    fi
    echo "slim_tree: kept ${keep%/}; the rest of bench/results is in $HOLD ($(du -sh "$HOLD" | cut -f1))" ;;
  back)
    [ -d "$HOLD" ] || { echo "slim_tree: nothing held"; exit 0; }
    if [ -d "$HOLD/.kept" ]; then
      mv "$HOLD/.kept/product-answers.tgz" "$(cat "$HOLD/.kept/folder")/" && rm -rf "$HOLD/.kept"
    fi
    for entry in "$HOLD"/*; do
      [ -e "$entry" ] || continue
      name=${entry#"$HOLD"/}
      if [ -d "$entry" ] && [ -d "bench/results/$name" ]; then  # restored meanwhile (a git checkout): keep both
        cp -rn "$entry"/. "bench/results/$name"/ && rm -rf "$entry"
      else
        mv "$entry" bench/results/
      fi
    done
    rmdir "$HOLD"
    echo "slim_tree: bench/results is whole again" ;;
  *) sed -n 2,10p "$0"; exit 2 ;;
esac
