#!/usr/bin/env bash
# Runs HERE, after a session's device calls: folds what the GPU machine brought back into a results
# folder's committed study, so that every record any machine made stays, and only what a resume needs
# travels to the next machine.
#
#   bash bench/gpu/merge_study.sh bench/results/<study folder> PACK [PACK ...]
#
# The folder holds the study in two files:
#   product-study.tgz    the stores (optuna.db, mlflow.db), every trial's folder and MLflow artifacts,
#                        the export; less the answer files: what `l4study` carries to the machine (~1 MB)
#   product-answers.tgz  every answers.jsonl (trials' and their MLflow copies, deduplicated as hard
#                        links): ~0.45 MB a trial, never carried (slim_tree.sh holds it out)
# Each PACK is a product-study.tgz a `wait` call returned (a piece .00 stands for its .01, .02, ...
# beside it), or any tar.gz of /tmp/product files; later packs win, so give them oldest first.
# Unpacking only adds and replaces files (the export excepted, replaced whole by a newer one), so every
# record the folder held stays.
set -euo pipefail
dir=${1:?usage: merge_study.sh bench/results/<study folder> PACK [PACK ...]}; shift
[ $# -gt 0 ] || { echo "merge_study: give at least one PACK" >&2; exit 2; }
[ -f "$dir/product-study.tgz" ] || { echo "merge_study: no $dir/product-study.tgz" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tree"
tar -xzf "$dir/product-study.tgz" -C "$work/tree"
[ -f "$dir/product-answers.tgz" ] && tar -xzf "$dir/product-answers.tgz" -C "$work/tree"
for pack in "$@"; do
  case "$pack" in
    *.tgz.00) cat "${pack%.00}".[0-9][0-9] > "$work/pack.tgz" ;;
    *) cp "$pack" "$work/pack.tgz" ;;
  esac
  # The export is of the newest study: a newer one replaces it whole (a trial off the front leaves it).
  if tar -tzf "$work/pack.tgz" | grep '^product-export/' > /dev/null; then rm -rf "$work/tree/product-export"; fi
  tar -xzf "$work/pack.tgz" -C "$work/tree"
done
# An answers file and its MLflow copy are the same bytes: one of them is stored (hardlink is
# util-linux's; by content alone, as the two were written at different times; without it the pack is
# larger, not wrong).
command -v hardlink > /dev/null && hardlink -q --content "$work/tree" > /dev/null
(cd "$work/tree" && find product -name answers.jsonl | sort > "$work/answers"
 tar -czf "$work/product-answers.tgz" -T "$work/answers"
 tar -czf "$work/product-study.tgz" --exclude=answers.jsonl product $(ls -d product-export 2>/dev/null))
mv "$work/product-study.tgz" "$work/product-answers.tgz" "$dir/"
echo "merge_study: $(find "$work/tree/product" -type f -path '*/trial-*' | wc -l) files in trial folders, $(wc -l < "$work/answers") answers files;" \
  "product-study.tgz $(stat -c %s "$dir/product-study.tgz") bytes, product-answers.tgz $(stat -c %s "$dir/product-answers.tgz") bytes"
