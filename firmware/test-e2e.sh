#!/usr/bin/env bash
# End to end with the real firmware: builds the node images and the emulator harness (what is
# missing or stale; firmware/build.sh is incremental), then runs tests/emulated_e2e.rs, which
# bridges the emulated node's UART0 to a pty read by an in-process gateway and checks the
# temperature on MQTT, the gateway's acks and node commands published over MQTT.
# Needs: node + npm (harness), mosquitto_pub (the test's independent MQTT client).
set -euo pipefail
cd "$(dirname "$0")/.."
firmware/build.sh
echo "==> end-to-end test (emulated node -> pty -> sensorgate -> MQTT)"
cargo test --test emulated_e2e -- --ignored
