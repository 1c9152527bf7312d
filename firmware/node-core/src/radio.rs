//! The LoRa node: the wired [`Node`] state machine behind a half-duplex radio that may only
//! transmit within its duty cycle, and that hears the gateway only in a listen window after
//! each of its own uplinks (like LoRaWAN class A).
//!
//! ```text
//!  Node::poll ─Send─▶ tx queue (4) ──airtime budget?──▶ Transmit ─▶ radio TX ─▶ transmitted()
//!                      │  no: wait until the budget has it               │
//!                      │  full: oldest dropped (readings stay queued      ▼
//!                      │        in the UplinkQueue and are resent)   Listen until now + window
//!                      ▼                                                 │ frame for us:
//!                  Sleep / Listen (always-listening node)                ▼ received() → Node,
//!                                                                          window restarts
//! ```
//!
//! The radio payload is one wire frame, COBS-stuffed, without the 0x00 delimiter (the radio
//! packet has its own length). The bridge relays it to the gateway byte for byte.
//! Retransmission is the [`Node`]'s: `Readings` stay in its queue until the gateway's `Ack`;
//! here the backoff restarts when a frame actually goes on air, plus random jitter.

use heapless::{Deque, Vec};
use sensorgate_wire::{Frame, FrameKind, MAX_FRAME, decode_raw, encode, unframe};

use crate::Millis;
use crate::duty::{DutyCycle, LoraParams};
use crate::node::{Effect, Node, Poll};

/// Frames waiting for airtime: a Hello, a Readings, a Heartbeat and an Ack fit. When it is
/// full, `Readings` give way first: they stay in the node's uplink queue and are resent. Other
/// frames are then dropped oldest first and recovered by the protocol (the gateway resends a
/// command whose Ack it did not get and asks for a Hello it is missing).
pub const TX_QUEUE_LEN: usize = 4;

/// One radio packet: a COBS-stuffed frame without its delimiter.
pub type Payload = Vec<u8, MAX_FRAME>;

/// Encodes `frame` as a radio payload. `None` only if the frame does not fit [`MAX_FRAME`],
/// which no frame of the wire format does.
pub fn to_payload(frame: &Frame) -> Option<Payload> {
    let mut buf = [0u8; MAX_FRAME];
    let bytes = encode(frame, &mut buf).ok()?;
    let stuffed = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    Vec::from_slice(stuffed).ok()
}

/// Radio settings of a LoRa node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RadioConfig {
    pub lora: LoraParams,
    pub duty: DutyCycle,
    /// How long the node listens after each uplink, and again after each frame it receives
    /// in that window, so the bridge can send several frames in a row.
    pub rx_window_ms: Millis,
    /// Listen whenever there is nothing to send (a mains-powered node), not only after uplinks.
    pub always_listen: bool,
    /// Each retransmission waits a random extra `0..jitter_ms`.
    pub jitter_ms: Millis,
}

impl RadioConfig {
    /// EU868 g1 sub-band (1 %), SF7/125 kHz, a 2 s listen window, up to 2 s of jitter.
    pub const EU868: RadioConfig = RadioConfig {
        lora: LoraParams::SF7_BW125,
        duty: DutyCycle::eu868_g1(),
        rx_window_ms: 2_000,
        always_listen: false,
        jitter_ms: 2_000,
    };
}

/// What the firmware should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RadioPoll {
    /// Transmit this packet now (its airtime is taken from the budget), then call
    /// [`RadioNode::transmitted`] or [`RadioNode::transmit_failed`].
    Transmit(Payload),
    /// Measure every sensor and pass the result to [`RadioNode::readings`].
    Measure,
    /// Measure the supply voltage and pass it to [`RadioNode::heartbeat`].
    Heartbeat,
    /// Receive until `until`; hand each packet to [`RadioNode::received`].
    Listen { until: Millis },
    /// Nothing to do before `until`: the radio may sleep.
    Sleep { until: Millis },
}

/// Counters since boot, for logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RadioStats {
    pub transmitted: u32,
    pub transmit_failed: u32,
    /// Frames dropped from the tx queue (full, or longer than the duty cycle's burst).
    pub tx_dropped: u32,
    /// `Readings` left to their retransmission because the tx queue was full.
    pub tx_deferred: u32,
    /// Times a frame waited for airtime.
    pub duty_waits: u32,
    pub received: u32,
    /// Packets that were not a valid frame (noise, collision, CRC).
    pub receive_errors: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Outgoing {
    payload: Payload,
    kind: FrameKind,
    seq: u32,
}

/// A LoRa sensor node's protocol and radio-access state.
#[derive(Debug)]
pub struct RadioNode {
    node: Node,
    config: RadioConfig,
    duty: DutyCycle,
    tx: Deque<Outgoing, TX_QUEUE_LEN>,
    in_flight: Option<(FrameKind, u32)>,
    listen_until: Millis,
    /// Set when the last poll found the head of the tx queue waiting for airtime.
    waiting_for_airtime: bool,
    rng: u32,
    stats: RadioStats,
}

impl RadioNode {
    pub fn new(node: Node, config: RadioConfig) -> Self {
        // Any non-zero seed works for xorshift; the boot id differs per boot and per node.
        let seed = node.boot_id() ^ node.node_id().rotate_left(13);
        RadioNode {
            node,
            config,
            duty: config.duty,
            tx: Deque::new(),
            in_flight: None,
            listen_until: 0,
            waiting_for_airtime: false,
            rng: if seed == 0 { 0x9E37_79B9 } else { seed },
            stats: RadioStats::default(),
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn stats(&self) -> RadioStats {
        self.stats
    }

    /// No frame is waiting to go on air (e.g. the `Ack` of a `Reboot` has left).
    pub fn tx_idle(&self) -> bool {
        self.tx.is_empty() && self.in_flight.is_none()
    }

    /// The next thing to do. Call again after doing it.
    pub fn poll(&mut self, now: Millis) -> RadioPoll {
        // The window belongs to the bridge: do not talk over it, do not measure in it.
        if now < self.listen_until {
            return RadioPoll::Listen {
                until: self.listen_until,
            };
        }
        let mut until = loop {
            match self.node.poll(now) {
                Poll::Send(frame) => self.enqueue(&frame),
                Poll::Measure => return RadioPoll::Measure,
                Poll::Heartbeat => return RadioPoll::Heartbeat,
                Poll::Idle { until } => break until,
            }
        };
        while let Some(next) = self.tx.front() {
            let airtime_us = self.config.lora.airtime_us(next.payload.len());
            match self.duty.try_transmit(airtime_us, now) {
                Ok(()) => {
                    self.waiting_for_airtime = false;
                    if let Some(out) = self.tx.pop_front() {
                        self.in_flight = Some((out.kind, out.seq));
                        return RadioPoll::Transmit(out.payload);
                    }
                }
                Err(Millis::MAX) => {
                    // Longer than the whole burst: it can never be sent.
                    self.tx.pop_front();
                    self.stats.tx_dropped = self.stats.tx_dropped.saturating_add(1);
                }
                Err(at) => {
                    if !self.waiting_for_airtime {
                        self.waiting_for_airtime = true;
                        self.stats.duty_waits = self.stats.duty_waits.saturating_add(1);
                    }
                    until = until.min(at);
                    break;
                }
            }
        }
        if self.config.always_listen {
            RadioPoll::Listen { until }
        } else {
            RadioPoll::Sleep { until }
        }
    }

    /// Queues the `Readings` frame for a measurement just taken.
    pub fn readings(&mut self, readings: sensorgate_wire::Readings, now: Millis) {
        let frame = self.node.readings(readings, now);
        self.enqueue(&frame);
    }

    /// Queues the `Heartbeat` frame, given the supply voltage just measured.
    pub fn heartbeat(&mut self, supply_mv: u16, now: Millis) {
        let frame = self.node.heartbeat(supply_mv, now);
        self.enqueue(&frame);
    }

    /// The packet from the last [`RadioPoll::Transmit`] went on air and ended at `now`:
    /// the listen window opens.
    pub fn transmitted(&mut self, now: Millis) {
        if let Some((kind, seq)) = self.in_flight.take() {
            if kind == FrameKind::Readings {
                let jitter = self.jitter();
                self.node.transmitted(seq, now, jitter);
            }
            self.stats.transmitted = self.stats.transmitted.saturating_add(1);
        }
        self.listen_until = now.saturating_add(self.config.rx_window_ms);
    }

    /// The radio failed to send the last packet. Readings are resent by the node's queue;
    /// other frames are lost (and recovered by the protocol, see [`TX_QUEUE_LEN`]).
    pub fn transmit_failed(&mut self, _now: Millis) {
        if self.in_flight.take().is_some() {
            self.stats.transmit_failed = self.stats.transmit_failed.saturating_add(1);
        }
    }

    /// Handles a received packet. A frame addressed to this node restarts the listen window;
    /// an answer (the `Ack` of a command) is queued for the next transmission. Returns what
    /// only the firmware can do.
    pub fn received(&mut self, payload: &[u8], now: Millis) -> Effect {
        let mut raw = [0u8; MAX_FRAME];
        let decoded = unframe(payload, &mut raw).and_then(decode_raw);
        let (addressee, reply) = match &decoded {
            Ok(frame) => {
                self.stats.received = self.stats.received.saturating_add(1);
                (Some(frame.header.node_id), self.node.on_frame(frame, now))
            }
            Err(error) => {
                self.stats.receive_errors = self.stats.receive_errors.saturating_add(1);
                (
                    error.header().map(|h| h.node_id),
                    self.node.on_frame_error(error),
                )
            }
        };
        if addressee == Some(self.node.node_id()) && now < self.listen_until {
            self.listen_until = now.saturating_add(self.config.rx_window_ms);
        }
        if let Some(frame) = &reply.frame {
            self.enqueue(frame);
        }
        reply.effect
    }

    fn enqueue(&mut self, frame: &Frame) {
        let kind = frame.kind();
        let seq = frame.header.seq;
        // A reading still waiting for airtime is not queued twice by its retransmission.
        if self.tx.iter().any(|o| o.kind == kind && o.seq == seq) {
            return;
        }
        let Some(payload) = to_payload(frame) else {
            self.stats.tx_dropped = self.stats.tx_dropped.saturating_add(1);
            return;
        };
        if self.tx.is_full() {
            if kind == FrameKind::Readings || self.remove_a_reading() {
                self.stats.tx_deferred = self.stats.tx_deferred.saturating_add(1);
                if kind == FrameKind::Readings {
                    return;
                }
            } else {
                self.tx.pop_front();
                self.stats.tx_dropped = self.stats.tx_dropped.saturating_add(1);
            }
        }
        // Cannot fail: there is room after the pop above.
        let _ = self.tx.push_back(Outgoing { payload, kind, seq });
    }

    /// Takes the newest `Readings` out of the tx queue (its node queue resends it). Returns
    /// whether there was one.
    fn remove_a_reading(&mut self) -> bool {
        let Some(index) = self.tx.iter().rposition(|o| o.kind == FrameKind::Readings) else {
            return false;
        };
        let mut kept = Deque::new();
        let mut i = 0;
        while let Some(out) = self.tx.pop_front() {
            if i != index {
                let _ = kept.push_back(out);
            }
            i += 1;
        }
        self.tx = kept;
        true
    }

    /// Uniform-ish in `0..jitter_ms` (xorshift32; quality is irrelevant, independence is not).
    fn jitter(&mut self) -> Millis {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        match self.config.jitter_ms {
            0 => 0,
            span => Millis::from(x) % span,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeConfig;
    use crate::queue::Backoff;
    use sensorgate_wire::{
        Ack, AckStatus, Body, Command, FirmwareVersion, FrameRef, Header, Quantity, Reading,
        Readings, SensorInfo, Unit,
    };

    const ME: u32 = 0x17;
    const BOOT: u32 = 0xB007;
    const GATEWAY_BOOT: u32 = 0x6A7E;

    fn node(now: Millis) -> Node {
        let mut sensors = Vec::new();
        sensors
            .push(SensorInfo {
                channel: 0,
                quantity: Quantity::Temperature,
                unit: Unit::DegreeCelsius,
            })
            .unwrap();
        Node::new(
            NodeConfig {
                node_id: ME,
                boot_id: BOOT,
                firmware: FirmwareVersion::default(),
                report_interval_s: 60,
                heartbeat_interval_s: 600,
                sensors,
                backoff: Backoff {
                    first_ms: 10_000,
                    max_ms: 80_000,
                },
            },
            now,
        )
    }

    fn config() -> RadioConfig {
        RadioConfig {
            jitter_ms: 0,
            ..RadioConfig::EU868
        }
    }

    fn radio(config: RadioConfig) -> RadioNode {
        RadioNode::new(node(0), config)
    }

    fn sample() -> Readings {
        Readings::from_slice(&[Reading::new(0, 2150, -2)]).unwrap()
    }

    fn frame_of(payload: &[u8]) -> Frame {
        let mut raw = [0u8; MAX_FRAME];
        decode_raw(unframe(payload, &mut raw).unwrap()).unwrap()
    }

    fn transmit(poll: RadioPoll) -> Frame {
        match poll {
            RadioPoll::Transmit(payload) => frame_of(&payload),
            other => panic!("expected a transmission, got {other:?}"),
        }
    }

    fn gateway(body: Body) -> Payload {
        to_payload(&Frame::new(Header::new(ME, GATEWAY_BOOT, 0), body)).unwrap()
    }

    fn ack_of(seq: u32) -> Payload {
        gateway(Body::Ack(Ack::accepted(FrameRef { boot_id: BOOT, seq })))
    }

    /// Boot: a first measurement, Hello on air, its window passes, then the first Readings
    /// (seq 1) on air at 2 s.
    fn booted(config: RadioConfig) -> RadioNode {
        let mut r = radio(config);
        assert_eq!(r.poll(0), RadioPoll::Measure);
        r.readings(sample(), 0);
        assert!(matches!(transmit(r.poll(0)).body, Body::Hello(_)));
        r.transmitted(50);
        assert_eq!(r.poll(100), RadioPoll::Listen { until: 2_050 });
        let readings = transmit(r.poll(2_050));
        assert_eq!(readings.header, Header::new(ME, BOOT, 1));
        r.transmitted(2_100);
        r
    }

    #[test]
    fn the_payload_is_the_stuffed_frame_without_its_delimiter() {
        let f = Frame::new(Header::new(1, 2, 3), Body::Readings(sample()));
        let payload = to_payload(&f).unwrap();
        assert!(!payload.contains(&0));
        assert_eq!(frame_of(&payload), f);
    }

    #[test]
    fn every_uplink_opens_a_listen_window_and_nothing_is_sent_in_it() {
        let mut r = booted(config());
        assert_eq!(r.poll(2_100), RadioPoll::Listen { until: 4_100 });
        assert_eq!(r.poll(4_099), RadioPoll::Listen { until: 4_100 });
        // Window over: nothing due until the retransmission, 10 s after the time on air.
        assert_eq!(r.poll(4_100), RadioPoll::Sleep { until: 12_100 });
    }

    #[test]
    fn an_ack_in_the_window_ends_retransmission() {
        let mut r = booted(config());
        assert_eq!(r.received(&ack_of(1), 2_300), Effect::None);
        assert_eq!(r.node().unacknowledged(), 0);
        // The window restarted at the Ack, then nothing is due before the next reading.
        assert_eq!(r.poll(2_400), RadioPoll::Listen { until: 4_300 });
        assert_eq!(r.poll(4_300), RadioPoll::Sleep { until: 60_000 });
    }

    #[test]
    fn without_an_ack_the_reading_is_resent_with_growing_backoff() {
        let mut r = booted(config());
        let again = transmit(r.poll(12_100));
        assert_eq!(again.header, Header::new(ME, BOOT, 1));
        r.transmitted(12_150);
        // Second retransmission 20 s after the first one's time on air.
        assert_eq!(r.poll(14_150), RadioPoll::Sleep { until: 32_150 });
        assert_eq!(transmit(r.poll(32_150)).header.seq, 1);
        r.transmitted(32_200);
        assert_eq!(r.stats().transmitted, 4);
    }

    #[test]
    fn the_duty_cycle_holds_frames_until_the_budget_allows_then_sends_them_in_order() {
        // A budget of one packet: 60 ms burst at 1 %.
        let cfg = RadioConfig {
            duty: DutyCycle::new(10, 60_000),
            rx_window_ms: 0,
            ..config()
        };
        let mut r = radio(cfg);
        assert_eq!(r.poll(0), RadioPoll::Measure);
        r.readings(sample(), 0);
        let hello = transmit(r.poll(0));
        assert!(matches!(hello.body, Body::Hello(_)));
        let hello_airtime = cfg.lora.airtime_us(to_payload(&hello).unwrap().len());
        r.transmitted(0);
        // The Readings must wait until the bucket regained what the Hello used, less the
        // 60 ms burst's remainder: airtime(readings) - (60 ms - airtime(hello)).
        let readings_len = to_payload(&Frame::new(
            Header::new(ME, BOOT, 1),
            Body::Readings(sample()),
        ))
        .unwrap()
        .len();
        let missing = cfg.lora.airtime_us(readings_len) - (60_000 - hello_airtime);
        let ready_at = missing.div_ceil(10);
        assert_eq!(r.poll(1), RadioPoll::Sleep { until: ready_at });
        assert_eq!(r.stats().duty_waits, 1);
        assert_eq!(r.poll(ready_at - 1), RadioPoll::Sleep { until: ready_at });
        assert_eq!(r.stats().duty_waits, 1, "one wait, counted once");
        assert_eq!(transmit(r.poll(ready_at)).header.seq, 1);
    }

    #[test]
    fn over_an_hour_the_airtime_never_exceeds_the_duty_cycle() {
        // A node told to report every second cannot exceed 1 % of the hour on air.
        let cfg = RadioConfig {
            rx_window_ms: 0,
            ..config()
        };
        let mut n = node(0);
        n.on_frame(
            &Frame::new(
                Header::new(ME, GATEWAY_BOOT, 1),
                Body::Command(Command::SetReportInterval { seconds: 1 }),
            ),
            0,
        );
        let mut r = RadioNode::new(n, cfg);
        let mut airtime_us = 0u64;
        let mut now = 0;
        while now < 3_600_000 {
            match r.poll(now) {
                RadioPoll::Transmit(p) => {
                    airtime_us += cfg.lora.airtime_us(p.len());
                    r.transmitted(now);
                }
                RadioPoll::Measure => r.readings(sample(), now),
                RadioPoll::Heartbeat => r.heartbeat(3_300, now),
                RadioPoll::Listen { until } | RadioPoll::Sleep { until } => {
                    now = until.max(now + 1)
                }
            }
        }
        // 1 % of an hour plus the initial burst.
        assert!(
            airtime_us <= 36_000_000 + 3_600_000,
            "{airtime_us} µs on air"
        );
        assert!(
            airtime_us > 30_000_000,
            "the budget is used, {airtime_us} µs"
        );
        assert!(r.stats().duty_waits > 0);
    }

    #[test]
    fn a_full_tx_queue_leaves_readings_to_their_retransmission_and_keeps_other_frames() {
        let cfg = RadioConfig {
            duty: DutyCycle::new(1, 60_000), // 0.1 %: the budget is gone after one packet
            rx_window_ms: 0,
            ..config()
        };
        let mut r = radio(cfg);
        assert_eq!(r.poll(0), RadioPoll::Measure);
        r.readings(sample(), 0);
        transmit(r.poll(0));
        r.transmitted(0);
        for i in 1..6u64 {
            r.readings(sample(), i);
        }
        let stats = r.stats();
        assert_eq!((stats.tx_deferred, stats.tx_dropped), (2, 0));
        // All six stay in the node's queue for retransmission.
        assert_eq!(r.node().unacknowledged(), 6);
        let queued = |r: &RadioNode| -> std::vec::Vec<(FrameKind, u32)> {
            r.tx.iter().map(|o| (o.kind, o.seq)).collect()
        };
        assert_eq!(
            queued(&r),
            [1, 2, 3, 4].map(|s| (FrameKind::Readings, s)).to_vec()
        );
        // Their retransmissions fall due; those still queued are not queued twice.
        assert!(matches!(r.poll(10_010), RadioPoll::Sleep { .. }));
        assert_eq!(queued(&r).len(), TX_QUEUE_LEN);
        // A heartbeat takes the place of the newest reading, not of an older frame.
        r.heartbeat(3_300, 10_020);
        assert_eq!(
            queued(&r),
            [
                (FrameKind::Readings, 1),
                (FrameKind::Readings, 2),
                (FrameKind::Readings, 3),
                (FrameKind::Heartbeat, 7),
            ]
        );
        assert_eq!(r.stats().tx_dropped, 0);
    }

    #[test]
    fn a_command_in_the_window_is_acked_after_the_window_and_its_effect_returned() {
        let mut r = booted(config());
        let identify = Frame::new(
            Header::new(ME, GATEWAY_BOOT, 9),
            Body::Command(Command::Identify { seconds: 3 }),
        );
        let effect = r.received(&to_payload(&identify).unwrap(), 2_500);
        assert_eq!(effect, Effect::Identify { until: 5_500 });
        assert_eq!(r.poll(2_600), RadioPoll::Listen { until: 4_500 });
        let ack = transmit(r.poll(4_500));
        assert_eq!(
            ack.body,
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: GATEWAY_BOOT,
                seq: 9
            }))
        );
        assert!(!r.tx_idle());
        r.transmitted(4_550);
        assert!(r.tx_idle());
        // The Ack's own window.
        assert_eq!(r.poll(4_560), RadioPoll::Listen { until: 6_550 });
    }

    #[test]
    fn noise_and_other_nodes_frames_do_not_extend_the_window() {
        let mut r = booted(config());
        assert_eq!(r.received(&[1, 2, 3, 4, 5, 6, 7, 8], 2_500), Effect::None);
        let theirs = to_payload(&Frame::new(
            Header::new(ME + 1, 5, 5),
            Body::Readings(sample()),
        ))
        .unwrap();
        r.received(&theirs, 2_600);
        assert_eq!(r.poll(2_700), RadioPoll::Listen { until: 4_100 });
        let stats = r.stats();
        assert_eq!((stats.received, stats.receive_errors), (1, 1));
        assert_eq!(r.node().unacknowledged(), 1);
    }

    #[test]
    fn an_undecodable_command_for_us_is_refused_over_the_air() {
        let mut r = booted(config());
        // A command kind with a body this firmware cannot read (an unknown command variant).
        let mut raw = [0u8; MAX_FRAME];
        let good = Frame::new(
            Header::new(ME, GATEWAY_BOOT, 4),
            Body::Command(Command::Reboot),
        );
        let n = sensorgate_wire::encode_raw(&good, &mut raw).unwrap().len();
        let body_at = n - 4 - 1;
        raw[body_at] = 99; // a command variant nobody knows
        let crc = sensorgate_wire::checksum(&raw[..n - 4]).to_le_bytes();
        raw[n - 4..n].copy_from_slice(&crc);
        let inner = stuff(&raw[..n]);
        assert_eq!(r.received(&inner, 2_500), Effect::None);
        let nack = transmit(r.poll(4_500));
        assert!(matches!(
            nack.body,
            Body::Ack(Ack {
                of: FrameRef { seq: 4, .. },
                status: AckStatus::Rejected(_)
            })
        ));
    }

    /// COBS-stuffs raw bytes (test helper; the crate's own encoder is private).
    fn stuff(raw: &[u8]) -> std::vec::Vec<u8> {
        let mut out = vec![0u8];
        let mut code_at = 0;
        for &b in raw {
            if b == 0 {
                out[code_at] = (out.len() - code_at) as u8;
                code_at = out.len();
                out.push(0);
            } else {
                out.push(b);
            }
        }
        out[code_at] = (out.len() - code_at) as u8;
        out
    }

    #[test]
    fn a_reboot_waits_for_its_ack_to_leave() {
        let mut r = booted(config());
        let reboot = Frame::new(
            Header::new(ME, GATEWAY_BOOT, 3),
            Body::Command(Command::Reboot),
        );
        assert_eq!(
            r.received(&to_payload(&reboot).unwrap(), 2_500),
            Effect::Reboot
        );
        assert!(!r.tx_idle());
        transmit(r.poll(4_500));
        r.transmit_failed(4_550);
        assert_eq!(r.stats().transmit_failed, 1);
        assert!(r.tx_idle());
    }

    #[test]
    fn an_always_listening_node_listens_when_idle() {
        let cfg = RadioConfig {
            always_listen: true,
            ..config()
        };
        let mut r = booted(cfg);
        assert_eq!(r.poll(4_100), RadioPoll::Listen { until: 12_100 });
    }

    #[test]
    fn jitter_spreads_retransmissions_of_identical_nodes() {
        let cfg = RadioConfig {
            jitter_ms: 5_000,
            ..config()
        };
        let mut a = booted(cfg);
        let mut b = RadioNode::new(
            Node::new(
                NodeConfig {
                    boot_id: BOOT ^ 1,
                    ..NodeConfig {
                        node_id: ME,
                        boot_id: BOOT,
                        firmware: FirmwareVersion::default(),
                        report_interval_s: 60,
                        heartbeat_interval_s: 600,
                        sensors: Vec::new(),
                        backoff: Backoff {
                            first_ms: 10_000,
                            max_ms: 80_000,
                        },
                    }
                },
                0,
            ),
            cfg,
        );
        b.poll(0);
        b.readings(sample(), 0);
        transmit(b.poll(0));
        b.transmitted(50);
        transmit(b.poll(2_050));
        b.transmitted(2_100);
        let due = |r: &mut RadioNode| match r.poll(4_100) {
            RadioPoll::Sleep { until } => until,
            other => panic!("{other:?}"),
        };
        let (ta, tb) = (due(&mut a), due(&mut b));
        assert!((12_100..17_100).contains(&ta) && (12_100..17_100).contains(&tb));
        assert_ne!(ta, tb);
    }
}
