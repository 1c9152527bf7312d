//! The radio-to-serial bridge: relays what LoRa nodes send to the gateway, and what the gateway
//! sends them back over the air when they can hear it.
//!
//! ```text
//!  radio RX ─▶ unframe (COBS, CRC) ─▶ node kind? ─▶ Relayed { rssi, snr, raw } ─▶ serial
//!                 │ bad: counted          │ gateway kind (another bridge's downlink): counted
//!                 ▼                       ▼
//!            (nothing)            node N heard: its listen window opens
//!                                   [end of RX + turnaround, end of RX + window)
//!
//!  serial ─▶ Ack/Command for node N ─▶ N's queue (4, oldest dropped and counted,
//!               │ for the bridge itself:     identical copies merged, expired after a TTL)
//!               ▼ answered here                      │
//!                                    window open and the packet ends inside it,
//!                                    or N always listens, and airtime budget ─▶ radio TX
//! ```
//!
//! The relayed frame is never decoded: the gateway checks the node's own CRC and reads it.
//! The bridge only peeks at the header to know who spoke. It is itself a node to the gateway:
//! it sends `Hello` at boot and a `Heartbeat` whose `readings_dropped` counts downlinks it
//! dropped, and it answers `Command`s addressed to its own id.

use heapless::{Deque, Vec};
use sensorgate_wire::{
    Ack, AckStatus, Body, Command, FirmwareVersion, Frame, FrameError, FrameKind, FrameRef, Header,
    Heartbeat, Hello, LinkQuality, MAX_FRAME, NackReason, PROTOCOL_VERSION, Relayed, unframe,
};

use crate::Millis;
use crate::duty::{DutyCycle, LoraParams};
use crate::node::{Effect, MAX_REPORT_INTERVAL_S, Reply};
use crate::radio::{Payload, to_payload};

/// Nodes the bridge keeps state for (listen window, downlink queue). A node without queued
/// downlinks gives its place to a new one; 16 × 4 downlinks are about 7 KB of RAM.
pub const MAX_NODES: usize = 16;
/// Downlinks waiting per node: an Ack and a few commands. The gateway resends commands that
/// are not acknowledged, so an older entry dropped when it is full is not lost for good.
pub const NODE_QUEUE_LEN: usize = 4;
/// Node ids configured as always listening.
pub const MAX_ALWAYS_LISTENING: usize = 8;

/// The bridge's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The bridge's own node id (outer header of `Relayed`, its `Hello` and `Heartbeat`).
    pub bridge_id: u32,
    pub boot_id: u32,
    pub firmware: FirmwareVersion,
    pub lora: LoraParams,
    /// The bridge's own airtime budget.
    pub duty: DutyCycle,
    /// The nodes' listen window after each uplink ([`crate::RadioConfig::rx_window_ms`]).
    pub rx_window_ms: Millis,
    /// Time a node needs after its uplink to switch its radio to receive.
    pub turnaround_ms: Millis,
    /// Nodes that listen all the time: their downlinks go out as soon as airtime allows.
    pub always_listening: Vec<u32, MAX_ALWAYS_LISTENING>,
    /// A downlink not delivered within this time is dropped (and counted).
    pub downlink_ttl_ms: Millis,
    pub heartbeat_interval_s: u32,
}

/// What the firmware should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgePoll {
    /// Send this frame to the gateway over the serial link.
    Serial(Frame),
    /// Transmit this packet now (its airtime is taken from the budget), then call
    /// [`Bridge::transmitted`] or [`Bridge::transmit_failed`].
    Transmit { node_id: u32, payload: Payload },
    /// Receive until `until`, or until a frame arrives on the serial link.
    Listen { until: Millis },
}

/// Counters since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Node frames relayed to the gateway.
    pub relayed: u32,
    /// Radio packets that were not a valid frame (noise, collision, CRC).
    pub radio_invalid: u32,
    /// Valid frames not relayed: downlinks of another bridge, or too long to wrap.
    pub radio_ignored: u32,
    pub downlinks_queued: u32,
    /// Copies of a downlink already queued (the gateway resent it while the node slept).
    pub downlinks_merged: u32,
    pub downlinks_sent: u32,
    /// Dropped because the node's queue or the node table was full.
    pub downlinks_dropped: u32,
    /// Dropped because the node did not open a window within the TTL.
    pub downlinks_expired: u32,
    pub transmit_failed: u32,
    /// Frames from the gateway that are not for a node (kinds a bridge does not forward).
    pub serial_ignored: u32,
}

impl BridgeStats {
    /// Downlinks given up, as reported in the bridge's `Heartbeat`.
    pub fn downlinks_lost(&self) -> u32 {
        self.downlinks_dropped
            .saturating_add(self.downlinks_expired)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Downlink {
    payload: Payload,
    queued_at: Millis,
}

#[derive(Debug)]
struct Slot {
    node_id: u32,
    /// The node listens in `[window_from, window_until)`.
    window_from: Millis,
    window_until: Millis,
    queue: Deque<Downlink, NODE_QUEUE_LEN>,
}

/// The bridge's state.
#[derive(Debug)]
pub struct Bridge {
    config: BridgeConfig,
    duty: DutyCycle,
    slots: Vec<Slot, MAX_NODES>,
    in_flight: Option<(u32, Downlink)>,
    next_seq: u32,
    hello_due: bool,
    heartbeat_interval_ms: Millis,
    next_heartbeat_at: Millis,
    last_command: Option<(FrameRef, AckStatus)>,
    stats: BridgeStats,
}

impl Bridge {
    /// A bridge that has just booted: `Hello` is due.
    pub fn new(config: BridgeConfig, now: Millis) -> Self {
        let heartbeat_interval_ms = Millis::from(config.heartbeat_interval_s.max(1)) * 1000;
        Bridge {
            duty: config.duty,
            config,
            slots: Vec::new(),
            in_flight: None,
            next_seq: 0,
            hello_due: true,
            heartbeat_interval_ms,
            next_heartbeat_at: now.saturating_add(heartbeat_interval_ms),
            last_command: None,
            stats: BridgeStats::default(),
        }
    }

    pub fn stats(&self) -> BridgeStats {
        self.stats
    }

    /// Downlinks waiting for their nodes.
    pub fn queued(&self) -> usize {
        self.slots.iter().map(|s| s.queue.len()).sum()
    }

    /// A packet received over the air, with the link quality it arrived with. Returns the
    /// `Relayed` frame for the gateway, or `None` (counted) if it is not to be relayed.
    pub fn on_radio(&mut self, payload: &[u8], link: LinkQuality, now: Millis) -> Option<Frame> {
        let mut buf = [0u8; MAX_FRAME];
        let Ok(raw) = unframe(payload, &mut buf) else {
            self.stats.radio_invalid = self.stats.radio_invalid.saturating_add(1);
            return None;
        };
        let peeked = peek_header(raw);
        if let Some((kind, header)) = peeked
            && sent_by_a_gateway(kind, &header)
        {
            self.stats.radio_ignored = self.stats.radio_ignored.saturating_add(1);
            return None;
        }
        let Some(relayed) = Relayed::new(link, raw) else {
            self.stats.radio_ignored = self.stats.radio_ignored.saturating_add(1);
            return None;
        };
        if let Some((_, header)) = peeked {
            self.heard(header.node_id, now);
        }
        self.stats.relayed = self.stats.relayed.saturating_add(1);
        Some(Frame::new(self.next_header(), Body::Relayed(relayed)))
    }

    /// A frame from the gateway. `Ack`s and `Command`s for a node are queued for it; those for
    /// the bridge are answered (the reply goes back over serial, the effect is the firmware's).
    pub fn on_serial(&mut self, frame: &Frame, now: Millis) -> Reply {
        if frame.header.node_id == self.config.bridge_id {
            return self.on_own_frame(frame, now);
        }
        match frame.kind() {
            FrameKind::Ack | FrameKind::Command => self.queue_downlink(frame, now),
            _ => self.stats.serial_ignored = self.stats.serial_ignored.saturating_add(1),
        }
        NO_REPLY
    }

    /// Bytes from the gateway that did not decode. A command for the bridge it cannot read is
    /// refused with `Rejected(Unsupported)`; anything else is counted.
    pub fn on_serial_error(&mut self, error: &FrameError) -> Reply {
        let header = match error {
            FrameError::Body {
                kind: FrameKind::Command,
                header,
            } => Some(*header),
            FrameError::UnknownKind {
                header: Some(header),
                ..
            } => Some(*header),
            _ => None,
        };
        match header {
            Some(header) if header.node_id == self.config.bridge_id => {
                let ack = Ack::rejected(header.frame_ref(), NackReason::Unsupported);
                Reply {
                    frame: Some(self.own_frame(Body::Ack(ack))),
                    effect: Effect::None,
                }
            }
            _ => {
                self.stats.serial_ignored = self.stats.serial_ignored.saturating_add(1);
                NO_REPLY
            }
        }
    }

    /// The next thing to do. Call again after doing it.
    pub fn poll(&mut self, now: Millis) -> BridgePoll {
        if self.hello_due {
            self.hello_due = false;
            return BridgePoll::Serial(self.hello());
        }
        if now >= self.next_heartbeat_at {
            return BridgePoll::Serial(self.heartbeat(now));
        }
        self.expire(now);
        let mut until = self.next_heartbeat_at;
        for slot in &self.slots {
            if let Some(front) = slot.queue.front() {
                until = until.min(front.queued_at.saturating_add(self.config.downlink_ttl_ms));
            }
        }
        while let Some((index, airtime_us)) = self.next_downlink(now, &mut until) {
            match self.duty.try_transmit(airtime_us, now) {
                Ok(()) => {
                    let slot = &mut self.slots[index];
                    if let Some(downlink) = slot.queue.pop_front() {
                        let node_id = slot.node_id;
                        let payload = downlink.payload.clone();
                        self.in_flight = Some((node_id, downlink));
                        return BridgePoll::Transmit { node_id, payload };
                    }
                }
                Err(Millis::MAX) => {
                    // Longer than the whole burst: it can never be sent.
                    self.slots[index].queue.pop_front();
                    self.stats.downlinks_dropped = self.stats.downlinks_dropped.saturating_add(1);
                }
                Err(at) => {
                    until = until.min(at);
                    break;
                }
            }
        }
        BridgePoll::Listen { until }
    }

    /// The packet from the last [`BridgePoll::Transmit`] went on air and ended at `now`. The
    /// node restarts its listen window when it receives a frame, so it listens on.
    pub fn transmitted(&mut self, now: Millis) {
        let Some((node_id, _)) = self.in_flight.take() else {
            return;
        };
        self.stats.downlinks_sent = self.stats.downlinks_sent.saturating_add(1);
        let (turnaround, window) = (self.config.turnaround_ms, self.config.rx_window_ms);
        if let Some(slot) = self.slot_mut(node_id) {
            // The node has to process the frame before it listens again.
            slot.window_from = now.saturating_add(turnaround);
            slot.window_until = now.saturating_add(window);
        }
    }

    /// The radio failed to send the last packet: it goes back to the front of its queue.
    pub fn transmit_failed(&mut self, _now: Millis) {
        let Some((node_id, downlink)) = self.in_flight.take() else {
            return;
        };
        self.stats.transmit_failed = self.stats.transmit_failed.saturating_add(1);
        match self.slot_mut(node_id) {
            Some(slot) if !slot.queue.is_full() => {
                let _ = slot.queue.push_front(downlink);
            }
            _ => self.stats.downlinks_dropped = self.stats.downlinks_dropped.saturating_add(1),
        }
    }

    /// The queued downlink to send next: the longest-waiting one whose node listens now and
    /// for its whole airtime. Lowers `until` to when a known window opens.
    fn next_downlink(&self, now: Millis, until: &mut Millis) -> Option<(usize, u64)> {
        let mut best: Option<(usize, u64, Millis)> = None;
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(front) = slot.queue.front() else {
                continue;
            };
            let airtime_us = self.config.lora.airtime_us(front.payload.len());
            let ends_at = now.saturating_add(airtime_us.div_ceil(1000));
            let listening = if self.config.always_listening.contains(&slot.node_id) {
                true
            } else if now < slot.window_from {
                *until = (*until).min(slot.window_from);
                false
            } else {
                ends_at <= slot.window_until
            };
            if listening && best.is_none_or(|(_, _, queued_at)| front.queued_at < queued_at) {
                best = Some((index, airtime_us, front.queued_at));
            }
        }
        best.map(|(index, airtime_us, _)| (index, airtime_us))
    }

    fn queue_downlink(&mut self, frame: &Frame, now: Millis) {
        let Some(payload) = to_payload(frame) else {
            self.stats.downlinks_dropped = self.stats.downlinks_dropped.saturating_add(1);
            return;
        };
        let in_flight = self.in_flight.as_ref().map(|(_, d)| d.payload.clone());
        let Some(index) = self.slot_for(frame.header.node_id) else {
            self.stats.downlinks_dropped = self.stats.downlinks_dropped.saturating_add(1);
            return;
        };
        let slot = &mut self.slots[index];
        if slot.queue.iter().any(|d| d.payload == payload) || in_flight == Some(payload.clone()) {
            self.stats.downlinks_merged = self.stats.downlinks_merged.saturating_add(1);
            return;
        }
        if slot.queue.is_full() {
            slot.queue.pop_front();
            self.stats.downlinks_dropped = self.stats.downlinks_dropped.saturating_add(1);
        }
        let _ = slot.queue.push_back(Downlink {
            payload,
            queued_at: now,
        });
        self.stats.downlinks_queued = self.stats.downlinks_queued.saturating_add(1);
    }

    /// Node `node_id` was heard at `now` (end of its uplink): its window opens.
    fn heard(&mut self, node_id: u32, now: Millis) {
        let (turnaround, window) = (self.config.turnaround_ms, self.config.rx_window_ms);
        if let Some(index) = self.slot_for(node_id) {
            let slot = &mut self.slots[index];
            slot.window_from = now.saturating_add(turnaround);
            slot.window_until = now.saturating_add(window);
        }
    }

    /// The slot of `node_id`, making one if needed: a free one, else the one of a node with no
    /// queued downlinks heard longest ago. `None` when every slot has downlinks waiting.
    fn slot_for(&mut self, node_id: u32) -> Option<usize> {
        if let Some(index) = self.slots.iter().position(|s| s.node_id == node_id) {
            return Some(index);
        }
        let fresh = Slot {
            node_id,
            window_from: 0,
            window_until: 0,
            queue: Deque::new(),
        };
        if self.slots.push(fresh).is_ok() {
            return Some(self.slots.len() - 1);
        }
        let in_flight = self.in_flight.as_ref().map(|(id, _)| *id);
        let index = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.queue.is_empty() && Some(s.node_id) != in_flight)
            .min_by_key(|(_, s)| s.window_until)
            .map(|(index, _)| index)?;
        self.slots[index] = Slot {
            node_id,
            window_from: 0,
            window_until: 0,
            queue: Deque::new(),
        };
        Some(index)
    }

    fn slot_mut(&mut self, node_id: u32) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.node_id == node_id)
    }

    fn expire(&mut self, now: Millis) {
        let ttl = self.config.downlink_ttl_ms;
        for slot in self.slots.iter_mut() {
            while slot
                .queue
                .front()
                .is_some_and(|d| d.queued_at.saturating_add(ttl) <= now)
            {
                slot.queue.pop_front();
                self.stats.downlinks_expired = self.stats.downlinks_expired.saturating_add(1);
            }
        }
    }

    fn on_own_frame(&mut self, frame: &Frame, now: Millis) -> Reply {
        let Body::Command(command) = &frame.body else {
            return NO_REPLY; // an Ack for the bridge's own frames: nothing waits for one
        };
        let of = frame.header.frame_ref();
        if let Some((done, status)) = self.last_command
            && done == of
        {
            return Reply {
                frame: Some(self.own_frame(Body::Ack(Ack { of, status }))),
                effect: Effect::None,
            };
        }
        let (status, effect) = match *command {
            // The bridge reports no readings; its interval is the heartbeat's.
            Command::SetReportInterval { seconds } => {
                if seconds == 0 || seconds > MAX_REPORT_INTERVAL_S {
                    (
                        AckStatus::Rejected(NackReason::InvalidArgument),
                        Effect::None,
                    )
                } else {
                    self.heartbeat_interval_ms = Millis::from(seconds) * 1000;
                    self.next_heartbeat_at = now.saturating_add(self.heartbeat_interval_ms);
                    (AckStatus::Accepted, Effect::None)
                }
            }
            Command::Identify { seconds } => (
                AckStatus::Accepted,
                Effect::Identify {
                    until: now.saturating_add(Millis::from(seconds) * 1000),
                },
            ),
            Command::Reboot => (AckStatus::Accepted, Effect::Reboot),
            Command::SendHello => {
                self.hello_due = true;
                (AckStatus::Accepted, Effect::None)
            }
        };
        self.last_command = Some((of, status));
        Reply {
            frame: Some(self.own_frame(Body::Ack(Ack { of, status }))),
            effect,
        }
    }

    fn hello(&mut self) -> Frame {
        let body = Hello {
            firmware: self.config.firmware,
            report_interval_s: (self.heartbeat_interval_ms / 1000) as u32,
            sensors: Vec::new(),
        };
        self.own_frame(Body::Hello(body))
    }

    fn heartbeat(&mut self, now: Millis) -> Frame {
        self.next_heartbeat_at = now.saturating_add(self.heartbeat_interval_ms);
        let body = Heartbeat {
            battery_mv: 0, // powered by the gateway's USB port
            uptime_s: (now / 1000).min(u64::from(u32::MAX)) as u32,
            readings_dropped: self.stats.downlinks_lost(),
        };
        self.own_frame(Body::Heartbeat(body))
    }

    fn own_frame(&mut self, body: Body) -> Frame {
        Frame::new(self.next_header(), body)
    }

    fn next_header(&mut self) -> Header {
        let header = Header::new(self.config.bridge_id, self.config.boot_id, self.next_seq);
        self.next_seq = self.next_seq.wrapping_add(1);
        header
    }
}

/// Parses a list of node ids, decimal or `0x` hex, separated by commas or spaces (the
/// bridge's `SENSORGATE_LORA_ALWAYS_LISTENING`). `None` if an id is malformed or there are
/// more than [`MAX_ALWAYS_LISTENING`].
pub fn parse_node_ids(text: &str) -> Option<Vec<u32, MAX_ALWAYS_LISTENING>> {
    let mut ids = Vec::new();
    for item in text.split([',', ' ']).filter(|item| !item.is_empty()) {
        let id = match item.strip_prefix("0x").or_else(|| item.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => item.parse().ok()?,
        };
        ids.push(id).ok()?;
    }
    Some(ids)
}

const NO_REPLY: Reply = Reply {
    frame: None,
    effect: Effect::None,
};

/// A frame the gateway sends, heard from another bridge: a `Command`, a `Relayed`, or an `Ack`
/// with the gateway's zero boot id and sequence (nodes number their frames from a random boot id).
fn sent_by_a_gateway(kind: u8, header: &Header) -> bool {
    match FrameKind::from_code(kind) {
        Some(FrameKind::Command | FrameKind::Relayed) => true,
        Some(FrameKind::Ack) => header.boot_id == 0 && header.seq == 0,
        _ => false,
    }
}

/// The kind code and header of a raw (CRC-checked) frame of this protocol version, without
/// decoding its body.
fn peek_header(raw: &[u8]) -> Option<(u8, Header)> {
    let (&version, rest) = raw.split_first()?;
    if version != PROTOCOL_VERSION {
        return None;
    }
    let (&kind, mut rest) = rest.split_first()?;
    let mut field = || {
        let (value, used) = varint_u32(rest)?;
        rest = &rest[used..];
        Some(value)
    };
    Some((kind, Header::new(field()?, field()?, field()?)))
}

/// A postcard (LEB128) `u32`: value and bytes used.
fn varint_u32(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value: u32 = 0;
    for (i, &byte) in bytes.iter().take(5).enumerate() {
        let bits = u32::from(byte & 0x7F);
        if i == 4 && bits > 0x0F {
            return None;
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorgate_wire::{Reading, Readings, decode_raw, encode_raw};

    const BRIDGE: u32 = 0xB1D6E;
    const NODE: u32 = 0x17;
    const AWAKE: u32 = 0x42;
    const TTL: Millis = 600_000;
    const LINK: LinkQuality = LinkQuality {
        rssi_dbm: -97,
        snr_db: -3,
    };

    fn config() -> BridgeConfig {
        BridgeConfig {
            bridge_id: BRIDGE,
            boot_id: 0xB007,
            firmware: FirmwareVersion {
                major: 0,
                minor: 1,
                patch: 0,
            },
            lora: LoraParams::SF7_BW125,
            duty: DutyCycle::eu868_g1(),
            rx_window_ms: 2_000,
            turnaround_ms: 20,
            always_listening: Vec::from_slice(&[AWAKE]).unwrap(),
            downlink_ttl_ms: TTL,
            heartbeat_interval_s: 60,
        }
    }

    /// A bridge past its boot `Hello`.
    fn bridge(config: BridgeConfig) -> Bridge {
        let mut b = Bridge::new(config, 0);
        assert!(matches!(b.poll(0), BridgePoll::Serial(f) if f.kind() == FrameKind::Hello));
        b
    }

    fn uplink(node: u32, seq: u32) -> Frame {
        let readings = Readings::from_slice(&[Reading::new(0, 2150, -2)]).unwrap();
        Frame::new(Header::new(node, 0x5EED, seq), Body::Readings(readings))
    }

    fn payload(frame: &Frame) -> Payload {
        to_payload(frame).unwrap()
    }

    fn ack_for(node: u32, seq: u32) -> Frame {
        Frame::new(
            Header::new(node, 0, 0),
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: 0x5EED,
                seq,
            })),
        )
    }

    fn command_for(node: u32, seq: u32, command: Command) -> Frame {
        Frame::new(Header::new(node, 0x6A7E, seq), Body::Command(command))
    }

    fn sent(poll: BridgePoll) -> (u32, Frame) {
        match poll {
            BridgePoll::Transmit { node_id, payload } => {
                let mut raw = [0u8; MAX_FRAME];
                (
                    node_id,
                    decode_raw(unframe(&payload, &mut raw).unwrap()).unwrap(),
                )
            }
            other => panic!("expected a transmission, got {other:?}"),
        }
    }

    #[test]
    fn a_node_frame_is_relayed_byte_for_byte_with_its_link_quality() {
        let mut b = bridge(config());
        let frame = uplink(NODE, 5);
        let relayed = b.on_radio(&payload(&frame), LINK, 1_000).unwrap();
        assert_eq!(relayed.header, Header::new(BRIDGE, 0xB007, 1));
        let Body::Relayed(r) = &relayed.body else {
            panic!("{relayed:?}")
        };
        assert_eq!(r.link, LINK);
        let mut raw = [0u8; MAX_FRAME];
        assert_eq!(&r.inner[..], encode_raw(&frame, &mut raw).unwrap());
        assert_eq!(r.inner_frame().unwrap(), frame);
        // The gateway's decoder reads it from the serial link.
        let mut wire = [0u8; MAX_FRAME];
        let bytes = sensorgate_wire::encode(&relayed, &mut wire).unwrap();
        let mut acc = sensorgate_wire::Accumulator::new();
        let decoded: std::vec::Vec<_> = acc.feed_iter(bytes).collect();
        assert_eq!(decoded[0].result, Ok(relayed.clone()));
        assert_eq!(b.stats().relayed, 1);
    }

    #[test]
    fn noise_and_corrupted_frames_are_counted_not_relayed() {
        let mut b = bridge(config());
        let mut bad = payload(&uplink(NODE, 5));
        bad[6] ^= 0x01;
        assert_eq!(b.on_radio(&bad, LINK, 0), None);
        assert_eq!(b.on_radio(&[0x03, 0x11, 0x22], LINK, 0), None);
        assert_eq!(b.on_radio(&[], LINK, 0), None);
        assert_eq!(b.stats().radio_invalid, 3);
        assert_eq!(b.stats().relayed, 0);
    }

    #[test]
    fn another_bridges_downlinks_are_not_relayed_but_a_nodes_ack_is() {
        let mut b = bridge(config());
        for heard in [
            command_for(NODE, 1, Command::Reboot),
            ack_for(NODE, 3),
            Frame::new(Header::new(9, 9, 9), Body::Relayed(Relayed::default())),
        ] {
            assert_eq!(b.on_radio(&payload(&heard), LINK, 0), None, "{heard:?}");
        }
        assert_eq!(b.stats().radio_ignored, 3);
        // A node acknowledging a command carries its own boot id and sequence.
        let node_ack = Frame::new(
            Header::new(NODE, 0x5EED, 8),
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: 0x6A7E,
                seq: 1,
            })),
        );
        assert!(b.on_radio(&payload(&node_ack), LINK, 0).is_some());
    }

    #[test]
    fn a_downlink_waits_for_its_nodes_window_and_goes_out_inside_it() {
        let mut b = bridge(config());
        b.on_serial(&ack_for(NODE, 5), 100);
        assert_eq!(b.queued(), 1);
        assert_eq!(b.poll(100), BridgePoll::Listen { until: 60_000 });
        // The node's next uplink: the window opens after the turnaround.
        b.on_radio(&payload(&uplink(NODE, 6)), LINK, 10_000);
        assert_eq!(b.poll(10_000), BridgePoll::Listen { until: 10_020 });
        let (to, frame) = sent(b.poll(10_020));
        assert_eq!((to, frame), (NODE, ack_for(NODE, 5)));
        b.transmitted(10_060);
        assert_eq!(b.stats().downlinks_sent, 1);
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn several_downlinks_follow_each_other_in_one_window() {
        let mut b = bridge(config());
        b.on_radio(&payload(&uplink(NODE, 6)), LINK, 1_000);
        b.on_serial(&ack_for(NODE, 6), 1_010);
        b.on_serial(&command_for(NODE, 1, Command::SendHello), 1_010);
        assert_eq!(sent(b.poll(1_020)).1, ack_for(NODE, 6));
        b.transmitted(1_060);
        // The node restarts its window on receiving; it needs the turnaround first.
        assert_eq!(b.poll(1_060), BridgePoll::Listen { until: 1_080 });
        let (_, second) = sent(b.poll(1_080));
        assert_eq!(second, command_for(NODE, 1, Command::SendHello));
    }

    #[test]
    fn a_downlink_that_would_end_after_the_window_waits_for_the_next_one() {
        let mut b = bridge(config());
        b.on_radio(&payload(&uplink(NODE, 6)), LINK, 1_000);
        b.on_serial(&ack_for(NODE, 6), 2_980); // ~41 ms on air; the window ends at 3 000
        assert_eq!(b.poll(2_980), BridgePoll::Listen { until: 60_000 });
        b.on_radio(&payload(&uplink(NODE, 7)), LINK, 30_000);
        assert_eq!(sent(b.poll(30_020)).0, NODE);
    }

    #[test]
    fn an_always_listening_node_gets_its_downlink_at_once() {
        let mut b = bridge(config());
        b.on_serial(
            &command_for(AWAKE, 1, Command::Identify { seconds: 5 }),
            500,
        );
        assert_eq!(sent(b.poll(500)).0, AWAKE);
    }

    #[test]
    fn the_bridges_duty_cycle_holds_downlinks_back() {
        let mut b = bridge(BridgeConfig {
            duty: DutyCycle::new(10, 60_000), // room for one downlink
            ..config()
        });
        b.on_serial(&command_for(AWAKE, 1, Command::Reboot), 0);
        b.on_serial(&command_for(AWAKE, 2, Command::SendHello), 0);
        let (_, first) = sent(b.poll(0));
        b.transmitted(40);
        let BridgePoll::Listen { until } = b.poll(40) else {
            panic!("the budget is spent")
        };
        assert!(until > 1_000 && until < 10_000, "{until}");
        let (_, second) = sent(b.poll(until));
        assert_ne!(first, second);
    }

    #[test]
    fn the_oldest_downlink_across_nodes_goes_first() {
        let mut b = bridge(config());
        b.on_serial(&command_for(AWAKE, 2, Command::SendHello), 200);
        b.on_radio(&payload(&uplink(NODE, 6)), LINK, 1_000);
        b.on_serial(&ack_for(NODE, 6), 100);
        assert_eq!(sent(b.poll(1_020)).0, NODE);
        b.transmitted(1_060);
        assert_eq!(sent(b.poll(1_060)).0, AWAKE);
    }

    #[test]
    fn a_nodes_queue_is_bounded_drops_the_oldest_and_merges_copies() {
        let mut b = bridge(config());
        for seq in 0..NODE_QUEUE_LEN as u32 + 2 {
            b.on_serial(&command_for(NODE, seq, Command::SendHello), 0);
        }
        // The gateway resends a command the node has not acknowledged yet.
        b.on_serial(&command_for(NODE, 5, Command::SendHello), 10);
        let stats = b.stats();
        assert_eq!(
            (
                stats.downlinks_queued,
                stats.downlinks_dropped,
                stats.downlinks_merged
            ),
            (6, 2, 1)
        );
        assert_eq!(b.queued(), NODE_QUEUE_LEN);
        b.on_radio(&payload(&uplink(NODE, 1)), LINK, 1_000);
        assert_eq!(sent(b.poll(1_020)).1.header.seq, 2);
    }

    #[test]
    fn the_node_table_recycles_idle_nodes_and_drops_when_all_are_busy() {
        let mut b = bridge(config());
        for node in 0..MAX_NODES as u32 {
            b.on_radio(&payload(&uplink(1_000 + node, 1)), LINK, u64::from(node));
        }
        // A new node takes the place of the one heard longest ago.
        b.on_serial(&ack_for(5_000, 1), 100);
        assert_eq!(b.stats().downlinks_dropped, 0);
        for node in 1..MAX_NODES as u32 {
            b.on_serial(&ack_for(1_000 + node, 1), 100);
        }
        assert_eq!(b.queued(), MAX_NODES);
        b.on_serial(&ack_for(6_000, 1), 100);
        assert_eq!(b.stats().downlinks_dropped, 1);
        assert_eq!(b.queued(), MAX_NODES);
        // Relaying never depends on the table.
        assert!(b.on_radio(&payload(&uplink(7_000, 1)), LINK, 200).is_some());
    }

    #[test]
    fn undelivered_downlinks_expire_and_the_heartbeat_counts_them() {
        let mut b = bridge(BridgeConfig {
            downlink_ttl_ms: 30_000,
            ..config()
        });
        b.on_serial(&ack_for(NODE, 1), 1_000);
        assert_eq!(b.poll(1_000), BridgePoll::Listen { until: 31_000 });
        assert_eq!(b.poll(31_000), BridgePoll::Listen { until: 60_000 });
        assert_eq!(b.stats().downlinks_expired, 1);
        match b.poll(60_000) {
            BridgePoll::Serial(f) => match f.body {
                Body::Heartbeat(hb) => {
                    assert_eq!((hb.readings_dropped, hb.uptime_s), (1, 60));
                    assert_eq!(f.header.node_id, BRIDGE);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(b.poll(60_001), BridgePoll::Listen { until: 120_000 });
    }

    #[test]
    fn a_failed_transmission_is_retried_first() {
        let mut b = bridge(config());
        b.on_serial(&command_for(AWAKE, 1, Command::Reboot), 0);
        b.on_serial(&command_for(AWAKE, 2, Command::SendHello), 0);
        let (_, first) = sent(b.poll(0));
        // The gateway resends it while it is on air: not queued twice.
        b.on_serial(&first, 10);
        b.transmit_failed(40);
        assert_eq!(sent(b.poll(40)).1, first);
        assert_eq!(b.stats().transmit_failed, 1);
        assert_eq!(b.stats().downlinks_merged, 1);
    }

    #[test]
    fn commands_for_the_bridge_are_answered_once_and_not_forwarded() {
        let mut b = bridge(config());
        let identify = command_for(BRIDGE, 4, Command::Identify { seconds: 2 });
        let reply = b.on_serial(&identify, 1_000);
        assert_eq!(reply.effect, Effect::Identify { until: 3_000 });
        let ack = reply.frame.unwrap();
        assert_eq!(ack.header.node_id, BRIDGE);
        assert_eq!(
            ack.body,
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: 0x6A7E,
                seq: 4
            }))
        );
        let again = b.on_serial(&identify, 1_100);
        assert_eq!(again.effect, Effect::None);
        assert!(again.frame.is_some());
        assert_eq!(b.queued(), 0);
        // SendHello, and a heartbeat interval through SetReportInterval.
        b.on_serial(&command_for(BRIDGE, 5, Command::SendHello), 1_200);
        assert!(matches!(b.poll(1_200), BridgePoll::Serial(f) if f.kind() == FrameKind::Hello));
        let bad = b.on_serial(
            &command_for(BRIDGE, 6, Command::SetReportInterval { seconds: 0 }),
            1_300,
        );
        assert!(matches!(
            bad.frame.unwrap().body,
            Body::Ack(Ack {
                status: AckStatus::Rejected(NackReason::InvalidArgument),
                ..
            })
        ));
        b.on_serial(
            &command_for(BRIDGE, 7, Command::SetReportInterval { seconds: 10 }),
            1_300,
        );
        assert_eq!(b.poll(1_400), BridgePoll::Listen { until: 11_300 });
        let reboot = b.on_serial(&command_for(BRIDGE, 8, Command::Reboot), 2_000);
        assert_eq!(reboot.effect, Effect::Reboot);
    }

    #[test]
    fn an_unreadable_command_for_the_bridge_is_refused_and_other_kinds_are_ignored() {
        let mut b = bridge(config());
        let reply = b.on_serial_error(&FrameError::Body {
            kind: FrameKind::Command,
            header: Header::new(BRIDGE, 0x6A7E, 9),
        });
        assert!(matches!(
            reply.frame.unwrap().body,
            Body::Ack(Ack {
                status: AckStatus::Rejected(NackReason::Unsupported),
                ..
            })
        ));
        assert_eq!(b.on_serial_error(&FrameError::Crc), NO_REPLY);
        b.on_serial(&uplink(NODE, 1), 0);
        assert_eq!(b.stats().serial_ignored, 2);
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn always_listening_ids_parse_from_decimal_and_hex_lists() {
        assert_eq!(parse_node_ids("").unwrap(), []);
        assert_eq!(parse_node_ids("0x17, 42,0XFF").unwrap(), [0x17, 42, 0xFF]);
        assert_eq!(parse_node_ids("17,x"), None);
        assert_eq!(parse_node_ids("4294967296"), None);
        assert_eq!(parse_node_ids("1,2,3,4,5,6,7,8,9"), None);
    }

    #[test]
    fn the_header_peek_reads_postcard_varints() {
        for (node, boot, seq) in [(0, 0, 0), (1, 127, 128), (u32::MAX, 0x8000_0000, 300)] {
            let f = Frame::new(
                Header::new(node, boot, seq),
                Body::Readings(Readings::default()),
            );
            let mut raw = [0u8; MAX_FRAME];
            let raw = encode_raw(&f, &mut raw).unwrap();
            assert_eq!(
                peek_header(raw),
                Some((FrameKind::Readings.code(), f.header))
            );
        }
        assert_eq!(varint_u32(&[0xFF, 0xFF, 0xFF, 0xFF, 0x1F]), None);
        assert_eq!(varint_u32(&[0x80]), None);
        assert_eq!(peek_header(&[2, 2, 1, 1, 1]), None);
    }
}
