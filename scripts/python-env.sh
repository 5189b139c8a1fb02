#!/usr/bin/env bash
# Creates (if missing) the Python virtualenv used by tests/sdk_interop.rs at <repo>/.venv and
# installs the pinned official Meraki SDK and `requests` from tests/sdk/requirements.txt (and, on
# Python >= 3.11, `meraki-client` for the split-horizon tests of tests/tls_e2e.rs).
# Idempotent: does nothing when the environment already matches the requirements.
# Prints the interpreter's path, for MERAKI_SDK_PYTHON.
#
# Needs CPython >= 3.10 with the venv module (Debian/Ubuntu: apt-get install python3-venv) and
# access to PyPI. Choose the interpreter with PYTHON=/path/to/python3.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
req="$repo/tests/sdk/requirements.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

die() { echo "python-env.sh: $*" >&2; exit 1; }

command -v "$python" >/dev/null 2>&1 || die "$python not found; install CPython >= 3.10 or set PYTHON"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "$("$python" -V 2>&1) is too old: meraki 4.7.0 needs Python >= 3.10 (set PYTHON)"

if command -v sha256sum >/dev/null 2>&1; then
  want="$(sha256sum "$req" | cut -d' ' -f1)"
else
  want="$(shasum -a 256 "$req" | cut -d' ' -f1)"
fi

# A venv left half-made (e.g. ensurepip missing) has no working pip: start again.
if [ -e "$venv" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf -- "$venv"
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf -- "$venv"
    die "'$python -m venv' failed; on Debian/Ubuntu run: apt-get install python3-venv"
  fi
fi

if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
  || ! "$venv/bin/python" -c 'import meraki, requests' >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --requirement "$req"
  "$venv/bin/python" -m pip check >/dev/null || die "pip check failed in $venv"
  "$venv/bin/python" - <<'PY' || die "the installed SDK is not meraki 4.7.0"
import sys
import meraki, requests
assert meraki.__version__ == "4.7.0", meraki.__version__
if sys.version_info >= (3, 11):
    import meraki_client  # split-horizon tests (tests/tls_e2e.rs)
    assert meraki_client.__version__ == "0.22.0", meraki_client.__version__
PY
  echo "$want" >"$stamp"
fi

echo "$venv/bin/python"
