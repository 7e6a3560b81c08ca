#!/usr/bin/env bash
# Creates .venv with the pinned packages of tests/python/requirements.txt (idempotent: reinstalls only when the
# requirements change). Everything comes from PyPI by name; nothing is downloaded at test time.
set -euo pipefail
cd "$(dirname "$0")/.."
req=tests/python/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
