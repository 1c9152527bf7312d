// Runtime fixes for rp2040js 1.4.1 gaps that stop embassy-rp's buffered UART, applied to one
// emulated chip by the harness (node_modules stays untouched).
'use strict';

const UARTDR = 0x00;
const UARTDMACR = 0x48;
const UARTTXINTR = 1 << 5;
const ROSC_RANDOMBIT = 0x1c;

/**
 * 1. rp2040js raises the TX interrupt on every interrupt check, so the TX interrupt never
 *    clears and embassy's handler spins. Real PL011s (FIFO drained instantly here) raise it
 *    when a written byte has left: raise it only after a data-register write.
 * 2. UARTDMACR is not modelled and reads as all ones, making embassy think DMA owns the UART:
 *    store it as a plain register.
 */
function patchUart(uart) {
  let dmacr = 0;
  uart.checkInterrupts = function checkInterrupts() {
    this.rp2040.setInterrupt(this.irq, !!(this.interruptStatus & this.interruptMask));
  };
  const read = uart.readUint32.bind(uart);
  const write = uart.writeUint32.bind(uart);
  uart.readUint32 = (offset) => (offset === UARTDMACR ? dmacr : read(offset));
  uart.writeUint32 = (offset, value) => {
    if (offset === UARTDMACR) {
      dmacr = value & 0x7;
      return;
    }
    write(offset, value);
    if (offset === UARTDR) {
      uart.interruptStatus |= UARTTXINTR;
      uart.checkInterrupts();
    }
  };
}

/**
 * The ring oscillator is not modelled (reads as all ones). The node takes its boot id from
 * ROSC RANDOMBIT, so give that register random bits: each emulated boot gets a new boot id.
 */
function RandomRosc(rp2040, name, BasePeripheral) {
  const rosc = new BasePeripheral(rp2040, name);
  rosc.readUint32 = (offset) =>
    offset === ROSC_RANDOMBIT ? (Math.random() < 0.5 ? 0 : 1) : 0xffffffff;
  rosc.writeUint32 = () => {};
  return rosc;
}

module.exports = { patchUart, RandomRosc };
