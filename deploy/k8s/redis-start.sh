#!/bin/sh
# Starts redis-server with the password in PASSWORD_FILE (a Kubernetes Secret or a compose secret),
# handed over as config on stdin: never in redis-server's argv, its environment or a file of its own.
#   redis-start.sh PASSWORD_FILE [redis-server option...]
# The file holds one line of [A-Za-z0-9+/=_.-] (e.g. `openssl rand -hex 32`), which Redis's config
# syntax reads literally; anything else stops here rather than start Redis with another password.
# The StatefulSet (redis.yaml) and the compose demo both run it, through the image's own entrypoint,
# which drops root (after the secret is read) when started as root.
set -eu
file="$1"
shift
password=$(cat "$file")
case "$password" in
    "" | *[!A-Za-z0-9+/=_.-]*)
        echo "redis-start.sh: $file must hold one line of [A-Za-z0-9+/=_.-]" >&2
        exit 1 ;;
esac
exec docker-entrypoint.sh redis-server - "$@" <<EOF
requirepass "$password"
EOF
