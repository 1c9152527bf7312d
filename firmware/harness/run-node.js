#!/usr/bin/env node
// Runs the sensorgate node firmware ELF in the rp2040js RP2040 emulator and bridges its UART0
// (the node's frame link) to stdin/stdout as raw bytes, or to a serial device path such as the
// slave side of a pseudo-terminal (--serial /dev/pts/N). Harness messages go to stderr only.
//
//   node run-node.js [--elf PATH] [--temp CELSIUS] [--vsys MILLIVOLTS] [--speed N]
//                    [--serial PATH] [--exit-after SECONDS] [--verbose]
//
// --speed 1 (default) keeps emulated time at wall-clock pace, as a gateway talking to a real
// node expects; --speed 0 runs as fast as the host can (idle firmware reaches ~300x).
//
// Boot: the ELF's PT_LOAD segments are copied into emulated flash and the core starts from the
// vector table at 0x10000100, like the boot ROM after boot2 (no boot ROM image is needed).
// A watchdog reset (the node's Reboot command, or a hang) boots a fresh emulated chip.
'use strict';

const fs = require('fs');
const path = require('path');
const { Simulator, BasePeripheral } = require('rp2040js');
const { patchUart, RandomRosc } = require('./patches.js');

const FLASH_START = 0x10000000;
const VECTOR_TABLE = 0x10000100;
const CYCLE_NANOS = 8; // 125 MHz
const UART_BYTE_NANOS = Math.round(1e9 / 11520); // 10 bits per byte at 115200 baud

function parseArgs(argv) {
  const opts = {
    elf: path.join(__dirname, '../node/target/thumbv6m-none-eabi/release/sensorgate-node'),
    temp: 25.0,
    vsys: 5000,
    speed: 1,
    serial: null,
    exitAfter: 0,
    verbose: false,
  };
  for (let i = 2; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    const number = () => {
      const n = Number(value());
      if (!Number.isFinite(n)) usage(`${arg} needs a number`);
      return n;
    };
    switch (arg) {
      case '--elf': opts.elf = value(); break;
      case '--temp': opts.temp = number(); break;
      case '--vsys': opts.vsys = number(); break;
      case '--speed': opts.speed = number(); break;
      case '--serial': opts.serial = value(); break;
      case '--exit-after': opts.exitAfter = number(); break;
      case '--verbose': opts.verbose = true; break;
      case '-h': case '--help': usage(null); break;
      default: usage(`unknown option ${arg}`);
    }
  }
  return opts;
}

function usage(problem) {
  if (problem) process.stderr.write(`run-node: ${problem}\n`);
  process.stderr.write(fs.readFileSync(__filename, 'utf8').split('\n').slice(1, 13)
    .map((l) => l.replace(/^\/\/ ?/, '')).join('\n') + '\n');
  process.exit(problem ? 64 : 0);
}

/** The PT_LOAD segments of a 32-bit little-endian ARM ELF that land in flash. */
function flashSegments(elf) {
  if (elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 1 || elf[5] !== 1) {
    throw new Error('not a 32-bit little-endian ELF');
  }
  const phoff = elf.readUInt32LE(28);
  const phentsize = elf.readUInt16LE(42);
  const phnum = elf.readUInt16LE(44);
  const segments = [];
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    const type = elf.readUInt32LE(ph);
    const offset = elf.readUInt32LE(ph + 4);
    const paddr = elf.readUInt32LE(ph + 12);
    const filesz = elf.readUInt32LE(ph + 16);
    if (type === 1 && filesz > 0 && paddr >= FLASH_START && paddr < FLASH_START + 16 * 1024 * 1024) {
      segments.push({ address: paddr, bytes: elf.subarray(offset, offset + filesz) });
    }
  }
  return segments;
}

/** Raw 12-bit ADC sample of the RP2040 temperature sensor at `celsius` (datasheet 4.9.5). */
function tempSensorRaw(celsius) {
  const volts = 0.706 - (celsius - 27) * 0.001721;
  return Math.max(0, Math.min(4095, Math.round((volts / 3.3) * 4096)));
}

/** Raw ADC3 sample for VSYS through the Pico's 1/3 divider. */
function vsysRaw(millivolts) {
  return Math.max(0, Math.min(4095, Math.round((millivolts / 3 / 3300) * 4096)));
}

function quietLogger(verbose) {
  const say = (level) => (component, message) =>
    process.stderr.write(`rp2040js ${level} [${component}] ${message}\n`);
  const none = () => {};
  return {
    debug: none,
    info: verbose ? say('info') : none,
    warn: verbose ? say('warn') : none,
    error: say('error'),
  };
}

class Harness {
  constructor(opts, segments, output) {
    this.opts = opts;
    this.segments = segments;
    this.output = output; // (Buffer) => void
    this.input = []; // bytes waiting to enter the UART RX FIFO
    this.nextRxNanos = 0;
    this.outBytes = [];
    this.wallStart = process.hrtime.bigint();
    this.emulatedOffset = 0; // emulated nanos of chips before the last reboot
    this.boots = 0;
    this.boot();
  }

  boot() {
    // The Simulator is used only for its wiring of chip and clock; this harness runs the core.
    const { rp2040: mcu } = new Simulator();
    mcu.logger = quietLogger(this.opts.verbose);
    for (const { address, bytes } of this.segments) {
      mcu.flash.set(bytes, address - FLASH_START);
    }
    patchUart(mcu.uart[0]);
    mcu.peripherals[0x40060] = new RandomRosc(mcu, 'ROSC_BASE', BasePeripheral);
    mcu.adc.channelValues[4] = tempSensorRaw(this.opts.temp);
    mcu.adc.channelValues[3] = vsysRaw(this.opts.vsys);
    mcu.uart[0].onByte = (byte) => this.outBytes.push(byte);
    mcu.watchdog = mcu.peripherals[0x40058];
    mcu.watchdog.onWatchdogTrigger = () => {
      process.stderr.write('run-node: watchdog reset, rebooting the emulated node\n');
      this.rebootPending = true;
    };
    const view = new DataView(mcu.flash.buffer);
    const table = VECTOR_TABLE - FLASH_START;
    mcu.core.VTOR = VECTOR_TABLE;
    mcu.core.SP = view.getUint32(table, true);
    mcu.core.PC = view.getUint32(table + 4, true) & ~1;
    if (this.mcu) this.emulatedOffset += this.mcu.clock.nanos;
    this.mcu = mcu;
    this.nextRxNanos = 0;
    this.rebootPending = false;
    this.boots += 1;
    process.stderr.write(`run-node: booted ${path.basename(this.opts.elf)} (boot ${this.boots}), ` +
      `temperature ${this.opts.temp} °C (ADC ${mcu.adc.channelValues[4]}), VSYS ${this.opts.vsys} mV\n`);
  }

  /** Emulated time since the harness started, in nanoseconds. */
  get emulatedNanos() {
    return this.emulatedOffset + this.mcu.clock.nanos;
  }

  feed(bytes) {
    for (const b of bytes) this.input.push(b);
  }

  /** Runs a slice of emulation; returns the wall-clock milliseconds to wait before the next. */
  step() {
    const { speed } = this.opts;
    const wallNanos = Number(process.hrtime.bigint() - this.wallStart);
    const limit = speed > 0 ? wallNanos * speed - this.emulatedOffset : Infinity;
    let idle = false;
    for (let i = 0; i < 200000; i++) {
      const { mcu } = this;
      const { clock, core } = mcu;
      if (this.rebootPending) {
        this.boot();
        break;
      }
      this.deliverInput();
      if (clock.nanos >= limit) {
        idle = true;
        break;
      }
      if (core.waiting) {
        let dt = clock.nanosToNextAlarm;
        if (this.input.length > 0) dt = Math.min(dt || Infinity, Math.max(0, this.nextRxNanos - clock.nanos));
        if (!(dt > 0)) {
          // Waiting with nothing scheduled: only input can wake it.
          idle = this.input.length === 0;
          if (idle) break;
          dt = UART_BYTE_NANOS;
        }
        if (clock.nanos + dt > limit) {
          clock.tick(limit - clock.nanos);
          idle = true;
          break;
        }
        clock.tick(dt);
        i += dt / CYCLE_NANOS / 100;
      } else {
        clock.tick(core.executeInstruction() * CYCLE_NANOS);
      }
    }
    this.flushOutput();
    return idle ? 1 : 0;
  }

  /** Moves waiting input into the RX FIFO at the UART's byte rate, never overflowing it. */
  deliverInput() {
    const { mcu } = this;
    const uart = mcu.uart[0];
    while (this.input.length > 0 && mcu.clock.nanos >= this.nextRxNanos && !uart.rxFIFO.full) {
      uart.feedByte(this.input.shift());
      this.nextRxNanos = mcu.clock.nanos + UART_BYTE_NANOS;
    }
  }

  flushOutput() {
    if (this.outBytes.length > 0) {
      this.output(Buffer.from(this.outBytes));
      this.outBytes = [];
    }
  }
}

function main() {
  const opts = parseArgs(process.argv);
  let elf;
  try {
    elf = fs.readFileSync(opts.elf);
  } catch (e) {
    process.stderr.write(`run-node: cannot read ${opts.elf}: ${e.message} (build it with firmware/build.sh)\n`);
    process.exit(66);
  }
  const segments = flashSegments(elf);

  let output;
  let inputStream;
  if (opts.serial) {
    const fd = fs.openSync(opts.serial, fs.constants.O_RDWR | fs.constants.O_NOCTTY);
    output = (buf) => {
      try {
        fs.writeSync(fd, buf);
      } catch (e) {
        process.stderr.write(`run-node: write to ${opts.serial} failed: ${e.message}\n`);
      }
    };
    inputStream = fs.createReadStream(null, { fd, autoClose: false });
  } else {
    output = (buf) => process.stdout.write(buf);
    inputStream = process.stdin;
  }

  const harness = new Harness(opts, segments, output);
  inputStream.on('data', (chunk) => harness.feed(chunk));
  inputStream.on('error', (e) => process.stderr.write(`run-node: input: ${e.message}\n`));
  if (!opts.serial) inputStream.on('end', () => process.exit(0));
  for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
  if (opts.exitAfter > 0) setTimeout(() => process.exit(0), opts.exitAfter * 1000);

  const loop = () => {
    let wait;
    try {
      wait = harness.step();
    } catch (e) {
      process.stderr.write(`run-node: emulation stopped: ${e.stack || e}\n`);
      process.exit(70);
    }
    if (wait > 0) setTimeout(loop, wait);
    else setImmediate(loop);
  };
  loop();
}

module.exports = { flashSegments, tempSensorRaw, vsysRaw };
if (require.main === module) main();
