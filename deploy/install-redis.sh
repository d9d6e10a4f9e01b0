#!/usr/bin/env sh
# Installs redis-server (Debian/Ubuntu apt) unless it is already on PATH.
# The tests start real redis-server processes on free loopback ports; the cloud
# service uses Redis as its state store.
set -eu
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
# apt starts a system redis on 6379; edgefed's tests don't need it
($SUDO service redis-server stop >/dev/null 2>&1 || true)
redis-server --version
