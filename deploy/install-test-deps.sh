#!/usr/bin/env sh
# What the tests need from the system (Debian/Ubuntu apt), installed only if missing:
# redis-server (the tests start real Redis servers) and chromium (a headless browser
# opens the run report, tests/test_run_report.py).
set -eu
cd "$(dirname "$0")"
./install-redis.sh
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
