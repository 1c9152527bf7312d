#!/usr/bin/env bash
# Builds the firmware and runs it in the rp2040js emulator against the host-side test:
# Hello, Readings with the emulated ADC temperature, retransmission until Ack, commands and
# their Acks (including an undecodable one and a reboot).
set -euo pipefail
cd "$(dirname "$0")/.."
firmware/build.sh
echo "==> emulated node test"
cargo test -p sensorgate-node-core --test emulated_node -- --ignored
