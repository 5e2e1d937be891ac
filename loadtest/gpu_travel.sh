#!/usr/bin/env bash
# What travels to a GPU machine, and how to keep it small. A device run copies the working tree
# (tracked and untracked-not-ignored files) plus the paths named in its carry (.whl/ from
# gpu_wheels.sh), at most 64 MiB. The GPU check uses random weights, so a GPU run leaves the
# shipped weights (every *.safetensors under model/weights/, most of the tree's bytes) behind:
#
#   bash loadtest/gpu_wheels.sh            # .whl/: the wheels the GPU image lacks
#   bash loadtest/gpu_travel.sh prepare    # sparse checkout: the weights leave the working tree
#   ... the device run (carry [".whl"]) ...
#   bash loadtest/gpu_travel.sh restore    # the weights are back, byte for byte
#
# Nothing leaves the repository: the weights stay in git's objects and HEAD; only the working
# tree drops them while prepared (git sparse-checkout refuses if any of them has local edits).
#
#   bash loadtest/gpu_travel.sh size       # (default) what a prepared run carries, last line
#                                          # "travels: N MiB"; exit 1 at 56 MiB or more
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=56
DROP='model/weights/*.safetensors'         # bash pattern (* spans /): what a prepared run leaves
SPARSE=('/*' '!/model/weights/**/*.safetensors')  # the same, as sparse-checkout patterns

size() {
  local bytes=0 dropped=0 n f
  while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue                # deleted in the working tree, or left by prepare
    n=$(stat -c %s "$f")
    # shellcheck disable=SC2053           # $DROP is a pattern on purpose
    if [[ $f == $DROP ]]; then dropped=$((dropped + n)); else bytes=$((bytes + n)); fi
  done < <(git ls-files -z --cached --others --exclude-standard)
  local wheels=0
  if [ -d .whl ]; then wheels=$(du -sb .whl | cut -f1); fi
  local mib=$(((bytes + wheels + 1048575) / 1048576))
  echo "working tree: $((bytes / 1024)) KiB; left behind: $((dropped / 1024)) KiB of shipped weights"
  if [ -d .whl ]; then
    echo "wheels (.whl, carried): $((wheels / 1024)) KiB"
  else
    echo "wheels: .whl/ absent (bash loadtest/gpu_wheels.sh fetches them): not counted"
  fi
  echo "travels: $mib MiB"
  [ "$mib" -lt "$LIMIT_MIB" ]
}

case "${1:-size}" in
  size) size ;;
  prepare)
    git sparse-checkout set --no-cone "${SPARSE[@]}"
    size
    ;;
  restore) git sparse-checkout disable ;;
  *) echo "usage: loadtest/gpu_travel.sh [size|prepare|restore]" >&2; exit 2 ;;
esac
