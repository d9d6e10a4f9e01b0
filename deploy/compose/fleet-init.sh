#!/bin/sh
# One-shot set-up of the compose demo fleet on the shared /fleet volume:
# certificates, the cloud's keys and held-out data, and DEVICES device folders
# (keys, edge.toml, an inbox with demo clips). Idempotent: a second run keeps what exists.
# A real fleet provisions each device on the device itself (`edgefed edge init`) and
# gives it only ca.crt and the cloud's public keys; here one volume holds everything.
set -eu
DEVICES="${DEVICES:-2}"
[ -f /fleet/tls/ca.crt ] || edgefed certs --dir /fleet/tls --host cloud --host localhost --host 127.0.0.1
[ -f /fleet/data/central_heldout.safetensors ] || \
    edgefed prepare --out /fleet/data --clients "$DEVICES" --inboxes /fleet/devices
i=0
while [ "$i" -lt "$DEVICES" ]; do
    d="device-$i"
    [ -f "/fleet/devices/$d/edge.toml" ] || edgefed edge init --dir "/fleet/devices/$d" --device-id "$d" \
        --superlink cloud:9093 --model-service cloud:9300 --ca-cert /fleet/tls/ca.crt \
        --cloud-keys /fleet/data/keys/cloud
    i=$((i + 1))
done
