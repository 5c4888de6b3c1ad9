# Sourced by scripts/run and scripts/test: make .venv with dicomflow installed (idempotent).
set -eu
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # policy-rc.d 101: Debian's orthanc package must not start a system-wide Orthanc on
    # 8042/4242; tests and the demo start their own, on loopback, by PID.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    $SUDO rm -f /usr/sbin/policy-rc.d
}

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "dicomflow needs Python 3.11 or newer as \$PYTHON or python3" >&2
    exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
EXTRAS="${DICOMFLOW_EXTRAS:-}"
STAMP=".venv/.installed${EXTRAS:+-$EXTRAS}"
if [ ! -x .venv/bin/flow ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
    touch "$STAMP"
fi
