#!/bin/sh
# Enrols the demo devices with the running cloud (their node keys at the SuperLink,
# their signing keys in the aggregator's registry). Re-enrolling replaces a device's keys.
set -eu
DEVICES="${DEVICES:-2}"
i=0
while [ "$i" -lt "$DEVICES" ]; do
    edgefed cloud enrol --config /etc/edgefed/cloud.toml --device-id "device-$i" --keys "/fleet/devices/device-$i/keys"
    i=$((i + 1))
done
