#!/usr/bin/env bash
# Builds the node firmware images (release) and prepares the rp2040js emulator harness.
# Installs what is missing: the thumbv6m-none-eabi target (rustup) and the harness's npm
# packages (npm ci). Images land in firmware/node/target/images/:
#   sensorgate-node-uart.elf  frames over UART0, node id from the flash unique id (hardware)
#   sensorgate-node-usb.elf   frames over USB CDC-ACM, node id from the flash unique id (hardware)
#   sensorgate-node-emu.elf   UART0, node id 0x00C0FFEE (the emulator cannot read a flash id)
#   sensorgate-lora-node.elf  LoRa node, RFM95W/SX1276 on SPI1 (built only: no radio here)
#   sensorgate-lora-bridge.elf  LoRa-to-USB-CDC bridge, RFM95W/SX1276 on SPI1 (built only)
#   *.uf2                     for BOOTSEL drag-and-drop, when elf2uf2-rs is installed
# Environment: SENSORGATE_INTERVAL_S (reading interval, default 60) applies to every image;
# SENSORGATE_NODE_ID, if set, to the hardware images too; SENSORGATE_LORA_* (see README.md)
# to the LoRa images.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
node_dir="$here/node"
images="$node_dir/target/images"

cd "$node_dir"   # so rust-toolchain.toml applies
if ! rustup target list --installed | grep -qx thumbv6m-none-eabi; then
  echo "==> rustup target add thumbv6m-none-eabi"
  rustup target add thumbv6m-none-eabi
fi
if command -v npm >/dev/null 2>&1; then
  echo "==> npm ci (firmware/harness)"
  (cd "$here/harness" && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "warning: npm not found; the emulator harness is not installed" >&2
fi

mkdir -p "$images"
build() { # name, cargo args...
  local name="$1"; shift
  local start=$SECONDS
  echo "==> cargo build --release $* ($name)"
  cargo build --release --quiet "$@"
  cp "${CARGO_TARGET_DIR:-$node_dir/target}/thumbv6m-none-eabi/release/sensorgate-node" \
    "$images/sensorgate-node-$name.elf"
  echo "    built in $((SECONDS - start)) s"
}
build uart
build usb --no-default-features --features transport-usb
# A feature of the node crate only: the dependencies are shared with the hardware images.
build emu --features emulator

# Both LoRa images in one cargo run (they link in parallel); the bridge talks USB CDC-ACM.
start=$SECONDS
echo "==> cargo build --release --no-default-features --features radio,transport-usb (lora-node, lora-bridge)"
cargo build --release --quiet --no-default-features --features radio,transport-usb \
  --bin lora-node --bin lora-bridge
for bin in lora-node lora-bridge; do
  cp "${CARGO_TARGET_DIR:-$node_dir/target}/thumbv6m-none-eabi/release/$bin" \
    "$images/sensorgate-$bin.elf"
done
echo "    built in $((SECONDS - start)) s"

# Flash = what is programmed (boot2, vectors, code, read-only data, .data initialisers);
# static RAM = .data + .bss + .uninit (the stack takes the rest of the 264 KiB).
if command -v arm-none-eabi-size >/dev/null 2>&1; then size_tool=arm-none-eabi-size; else size_tool=size; fi
echo "==> sizes ($size_tool -A)"
for f in "$images"/*.elf; do
  "$size_tool" -A "$f" | awk -v name="$(basename "$f")" '
    $1 ~ /^\.(boot2|vector_table|text|rodata)$/ { flash += $2 }
    $1 == ".data" { flash += $2; ram += $2 }
    $1 ~ /^\.(bss|uninit)$/ { ram += $2 }
    END { printf "    %-30s flash %6d B (%.1f KiB)   static RAM %6d B (%.1f KiB)\n", name, flash, flash/1024, ram, ram/1024 }'
done

if command -v elf2uf2-rs >/dev/null 2>&1; then
  echo "==> elf2uf2-rs"
  for name in node-uart node-usb lora-node lora-bridge; do
    elf2uf2-rs "$images/sensorgate-$name.elf" "$images/sensorgate-$name.uf2"
  done
  ls -l "$images"/*.uf2 | awk '{ print "    " $NF ": " $5 " B" }'
else
  echo "    (no UF2: install elf2uf2-rs with 'cargo install elf2uf2-rs --no-default-features')"
fi
