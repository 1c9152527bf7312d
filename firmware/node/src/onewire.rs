//! A bit-banged 1-Wire master on one GPIO (open drain emulated by switching the pin between
//! output-low and input; the bus needs an external 4.7 kΩ pull-up). Each time slot is timed
//! with interrupts masked, at most ~500 µs for a reset.

use embassy_rp::Peri;
use embassy_rp::gpio::{Flex, Pull};
use embassy_rp::peripherals::PIN_22;
use embassy_time::{Duration, block_for};

pub struct OneWire {
    pin: Flex<'static>,
}

impl OneWire {
    pub fn new(pin: Peri<'static, PIN_22>) -> Self {
        let mut pin = Flex::new(pin);
        pin.set_pull(Pull::Up); // weak internal pull-up, in addition to the external one
        pin.set_low();
        pin.set_as_input();
        OneWire { pin }
    }

    /// Sends a reset pulse; `true` if a device answers with a presence pulse. A bus that is
    /// low before the pulse (no pull-up, short circuit) has no working device.
    pub fn reset(&mut self) -> bool {
        critical_section::with(|_| {
            if self.pin.is_low() {
                return false;
            }
            self.pin.set_as_output();
            us(480);
            self.pin.set_as_input();
            us(70);
            let present = self.pin.is_low();
            us(410);
            present
        })
    }

    pub fn write_byte(&mut self, byte: u8) {
        for bit in 0..8 {
            self.write_bit(byte & (1 << bit) != 0);
        }
    }

    pub fn read_byte(&mut self) -> u8 {
        (0..8).fold(0, |byte, bit| byte | (u8::from(self.read_bit()) << bit))
    }

    fn write_bit(&mut self, one: bool) {
        critical_section::with(|_| {
            self.pin.set_as_output();
            if one {
                us(6);
                self.pin.set_as_input();
                us(64);
            } else {
                us(60);
                self.pin.set_as_input();
                us(10);
            }
        })
    }

    fn read_bit(&mut self) -> bool {
        critical_section::with(|_| {
            self.pin.set_as_output();
            us(6);
            self.pin.set_as_input();
            us(9);
            let one = self.pin.is_high();
            us(55);
            one
        })
    }
}

fn us(micros: u64) {
    block_for(Duration::from_micros(micros));
}
