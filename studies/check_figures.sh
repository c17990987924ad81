#!/usr/bin/env bash
# Regenerate the study figures twice and fail if the two runs differ by one byte.
#
#   bash studies/check_figures.sh        (from the repository root, in its venv)
#
# 1. dvc repro studies/dvc.yaml:figures  builds what is missing: the organism (root stages),
#    its feature dashboards, the capitals study, the aggregation and studies/figures/.
# 2. The study's graph cache, its aggregation and the figures are then deleted and rebuilt
#    from the same organism (`dvc repro --force --single-item` of the study and figures stages):
#    attribution, pruning, aggregation and rendering all run again.
# 3. Both sets of figures (PNG and SVG) must be byte-identical. Exit 1 if not.
set -euo pipefail
cd "$(dirname "$0")/.."
dvc repro studies/dvc.yaml:figures
first=$(mktemp -d)
cp -r studies/figures/. "$first/"
rm -rf studies/capitals/graphs studies/capitals/aggregate studies/figures
dvc repro --force --single-item studies/dvc.yaml:capitals
dvc repro --force --single-item studies/dvc.yaml:figures
if diff -r "$first" studies/figures; then
  echo "figures: byte-identical across two runs ($(ls "$first" | wc -l) files)"
else
  echo "figures differ between two runs" >&2
  exit 1
fi
