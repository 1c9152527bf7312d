//! Radio duty cycle: a LoRa node may occupy the channel for only a fraction of the time
//! (1 % in the EU 868 MHz g1 sub-band). [`DutyCycle`] is a token bucket of airtime that refills
//! at that fraction of wall time; [`LoraParams::airtime_us`] computes a packet's time on air.

use crate::Millis;

/// Airtime budget: a bucket of `capacity_us` that refills at `per_mille`/1000 of elapsed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DutyCycle {
    per_mille: u32,
    capacity_us: u64,
    available_us: u64,
    updated_at: Millis,
}

impl DutyCycle {
    /// A full bucket allowing `per_mille`/1000 of the time on air, at most `burst_us` at once.
    pub const fn new(per_mille: u32, burst_us: u64) -> Self {
        DutyCycle {
            per_mille,
            capacity_us: burst_us,
            available_us: burst_us,
            updated_at: 0,
        }
    }

    /// 1 % with a 3.6 s burst (one hour's budget is 36 s; a tenth of that at once).
    pub const fn eu868_g1() -> Self {
        Self::new(10, 3_600_000)
    }

    /// Takes `airtime_us` from the budget if it is there. Otherwise returns the time at which
    /// it will be, and takes nothing.
    pub fn try_transmit(&mut self, airtime_us: u64, now: Millis) -> Result<(), Millis> {
        self.refill(now);
        if airtime_us <= self.available_us {
            self.available_us -= airtime_us;
            return Ok(());
        }
        if airtime_us > self.capacity_us || self.per_mille == 0 {
            // Never fits: the caller must shorten the packet.
            return Err(Millis::MAX);
        }
        let missing_us = airtime_us - self.available_us;
        // Wall time for the bucket to regain `missing_us`, rounded up to whole milliseconds.
        let wait_ms = (missing_us * 1000).div_ceil(u64::from(self.per_mille) * 1000);
        Err(now.saturating_add(wait_ms))
    }

    fn refill(&mut self, now: Millis) {
        let elapsed_ms = now.saturating_sub(self.updated_at);
        let gained_us = elapsed_ms.saturating_mul(u64::from(self.per_mille));
        self.available_us = self
            .available_us
            .saturating_add(gained_us)
            .min(self.capacity_us);
        self.updated_at = self.updated_at.max(now);
    }
}

/// LoRa modulation settings that determine time on air.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraParams {
    /// Spreading factor 7..=12.
    pub spreading_factor: u8,
    pub bandwidth_hz: u32,
    /// Coding rate 4/(4+cr), cr 1..=4.
    pub coding_rate: u8,
    pub preamble_symbols: u16,
    pub explicit_header: bool,
    pub crc: bool,
}

impl LoraParams {
    /// SF7, 125 kHz, 4/5, 8-symbol preamble, explicit header, CRC on.
    pub const SF7_BW125: LoraParams = LoraParams {
        spreading_factor: 7,
        bandwidth_hz: 125_000,
        coding_rate: 1,
        preamble_symbols: 8,
        explicit_header: true,
        crc: true,
    };

    /// Checks the settings a LoRa radio accepts (SF7–12; 125, 250 or 500 kHz; 4/5–4/8;
    /// at least 6 preamble symbols). `const`, so a firmware build fails on a bad setting.
    pub const fn check(&self) -> Result<(), &'static str> {
        if self.spreading_factor < 7 || self.spreading_factor > 12 {
            return Err("LoRa spreading factor must be 7..=12");
        }
        if !matches!(self.bandwidth_hz, 125_000 | 250_000 | 500_000) {
            return Err("LoRa bandwidth must be 125000, 250000 or 500000 Hz");
        }
        if self.coding_rate < 1 || self.coding_rate > 4 {
            return Err("LoRa coding rate must be 1..=4 (4/5 .. 4/8)");
        }
        if self.preamble_symbols < 6 {
            return Err("LoRa preamble must be at least 6 symbols");
        }
        Ok(())
    }

    /// Time on air of a `payload_len`-byte packet in microseconds (Semtech SX127x datasheet,
    /// section 4.1.1.7), with low-data-rate optimisation when a symbol exceeds 16 ms.
    pub fn airtime_us(&self, payload_len: usize) -> u64 {
        let sf = i64::from(self.spreading_factor);
        let symbol_us = (1_000_000i64 << sf) / i64::from(self.bandwidth_hz.max(1));
        let low_data_rate = symbol_us > 16_000;
        let numerator = 8 * payload_len as i64 - 4 * sf + 28 + if self.crc { 16 } else { 0 }
            - if self.explicit_header { 0 } else { 20 };
        let denominator = 4 * (sf - if low_data_rate { 2 } else { 0 });
        let blocks = if numerator > 0 {
            (numerator + denominator - 1) / denominator
        } else {
            0
        };
        let payload_symbols = 8 + blocks * (i64::from(self.coding_rate) + 4);
        // Preamble is (n + 4.25) symbols: count in quarter symbols to stay in integers.
        let preamble_quarters = (i64::from(self.preamble_symbols) * 4 + 17) * symbol_us;
        (preamble_quarters / 4 + payload_symbols * symbol_us) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn airtime_matches_the_semtech_calculator() {
        // Reference values from the SX127x formula: SF7/125 kHz/4:5, 8 preamble, header, CRC.
        assert_eq!(LoraParams::SF7_BW125.airtime_us(10) / 1000, 41); // 41.216 ms
        assert_eq!(LoraParams::SF7_BW125.airtime_us(51) / 1000, 102); // 102.656 ms
        let sf12 = LoraParams {
            spreading_factor: 12,
            ..LoraParams::SF7_BW125
        };
        assert_eq!(sf12.airtime_us(10) / 1000, 991); // 991.232 ms, low data rate optimised
    }

    #[test]
    fn check_accepts_radio_settings_and_names_the_bad_one() {
        assert_eq!(LoraParams::SF7_BW125.check(), Ok(()));
        let with = |sf, bw, cr| LoraParams {
            spreading_factor: sf,
            bandwidth_hz: bw,
            coding_rate: cr,
            ..LoraParams::SF7_BW125
        };
        assert_eq!(with(12, 500_000, 4).check(), Ok(()));
        assert!(
            with(6, 125_000, 1)
                .check()
                .unwrap_err()
                .contains("spreading")
        );
        assert!(
            with(7, 100_000, 1)
                .check()
                .unwrap_err()
                .contains("bandwidth")
        );
        assert!(with(7, 125_000, 5).check().unwrap_err().contains("coding"));
    }

    #[test]
    fn the_budget_refills_at_the_duty_cycle_fraction() {
        let mut duty = DutyCycle::new(10, 100_000); // 1 %, 100 ms burst
        assert_eq!(duty.try_transmit(60_000, 0), Ok(()));
        // 40 ms left; 60 ms more needs 20 ms of budget = 2 s of wall time.
        assert_eq!(duty.try_transmit(60_000, 0), Err(2_000));
        assert_eq!(duty.try_transmit(60_000, 1_999), Err(2_000));
        assert_eq!(duty.try_transmit(60_000, 2_000), Ok(()));
    }

    #[test]
    fn the_bucket_never_holds_more_than_its_burst_and_oversize_never_fits() {
        let mut duty = DutyCycle::new(10, 50_000);
        assert_eq!(duty.try_transmit(50_000, 1_000_000), Ok(()));
        assert!(duty.try_transmit(1, 1_000_000).is_err());
        assert_eq!(duty.try_transmit(50_001, 9_000_000), Err(Millis::MAX));
    }
}
