#!/usr/bin/env bash
# On the GPU machine: install one chunk of benchmarks/gpu/bundle.sh into /tmp (idempotent: a chunk already
# installed on this machine is skipped). Each chunk goes into its own directories, /tmp/sg/cK for the server and
# /tmp/art/cK for the user's process and the trainer, so that packages sharing a namespace directory across
# chunks never overwrite each other (pip --target would skip or replace such a directory).
#
#   bash benchmarks/gpu/install.sh .gpu-bundle/c1
#
# Leaves /tmp/sg/python (the server's Python: python3 with the server's chunks on PYTHONPATH, for
# SGLangConfig(server_python=...)), /tmp/art/env.sh (`. /tmp/art/env.sh` puts the trainer side on PYTHONPATH)
# and, from c1, the SmolLM2 tokenizer and config in /tmp/gpu/tok.
set -euo pipefail
chunk=${1:?usage: install.sh CHUNKDIR}
chunk=${chunk%/}
name=$(basename "$chunk")
SG=${SG_DIR:-/tmp/sg}
ART=${ART_DIR:-/tmp/art}
GPU=${GPU_DIR:-/tmp/gpu}
PY=${PYTHON:-python3}
mkdir -p "$SG" "$ART" "$GPU"
[ -f "$chunk/manifest.txt" ] || { echo "install.sh: $chunk has no manifest.txt (not a bundle chunk?)" >&2; exit 2; }
if [ -e "$SG/.done-$name" ]; then
  echo "install.sh: $name already installed"
else
  t0=$(date +%s)
  sg=(); art=()
  while read -r target wheel; do
    [ -n "$wheel" ] || continue
    case $target in
      sg) sg+=("$chunk/$wheel") ;;
      art) art+=("$chunk/$wheel") ;;
      both) sg+=("$chunk/$wheel"); art+=("$chunk/$wheel") ;;
      *) echo "install.sh: bad manifest line: $target $wheel" >&2; exit 2 ;;
    esac
  done <"$chunk/manifest.txt"
  pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check
       --no-warn-script-location --upgrade)
  rm -rf "${SG:?}/$name" "${ART:?}/$name"
  if [ ${#sg[@]} -gt 0 ]; then "${pip[@]}" --target "$SG/$name" "${sg[@]}"; fi
  if [ ${#art[@]} -gt 0 ]; then "${pip[@]}" --target "$ART/$name" "${art[@]}"; fi
  if [ -d "$chunk/stubs" ]; then mkdir -p "$ART/stubs" && cp -r "$chunk"/stubs/. "$ART/stubs/"; fi
  if [ -f "$chunk/tok.tar.gz" ]; then mkdir -p "$GPU/tok" && tar -C "$GPU/tok" -xzf "$chunk/tok.tar.gz"; fi
  touch "$SG/.done-$name"
  echo "install.sh: $name: ${#sg[@]} server wheels, ${#art[@]} trainer-side wheels in $(( $(date +%s) - t0 )) s"
fi
# The server's Python: every installed server chunk on PYTHONPATH (the backend drops the caller's PYTHONPATH).
cat >"$SG/python" <<EOF
#!/bin/sh
PYTHONPATH=\$(ls -d $SG/c*/ 2>/dev/null | tr '\n' ':') exec $PY "\$@"
EOF
chmod +x "$SG/python"
cat >"$ART/env.sh" <<EOF
# the trainer side's packages (real ones first, then the stubs), before the image's
export PYTHONPATH=\$(ls -d $ART/c*/ 2>/dev/null | tr '\n' ':')$ART/stubs\${PYTHONPATH:+:\$PYTHONPATH}
EOF
echo "install.sh: chunks installed on this machine: $(ls -a "$SG" | sed -n 's/^\.done-//p' | tr '\n' ' ')"
