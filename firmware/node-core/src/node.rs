//! The node's protocol state machine: which frame to send next, what to do with a frame from
//! the gateway. It does no I/O; the firmware loop asks [`Node::poll`] what is due, performs it
//! (sends a frame, takes a measurement) and hands incoming frames to [`Node::on_frame`].
//!
//! ```text
//!  boot ─▶ Hello ─▶ Readings every interval ──▶ queue ──(no Ack: backoff)──▶ retransmit
//!                   Heartbeat every interval          ◀──── Ack(boot id, seq) removes
//!  Command ─▶ carry out ─▶ Ack (Accepted | Rejected(reason)) ─▶ Effect for the firmware
//! ```

use sensorgate_wire::{
    Ack, AckStatus, Body, Command, FirmwareVersion, Frame, FrameError, FrameKind, FrameRef, Header,
    Heartbeat, Hello, MAX_SENSORS, NackReason, Readings, SensorInfo, heapless::Vec,
};

use crate::Millis;
use crate::queue::{Backoff, UplinkQueue};

/// Unacknowledged `Readings` kept for retransmission: at the default one-minute interval
/// this rides out a 16-minute gateway outage in about 1.5 KB of RAM.
pub const QUEUE_LEN: usize = 16;

/// Longest reporting interval a `SetReportInterval` may ask for: one day.
pub const MAX_REPORT_INTERVAL_S: u32 = 86_400;

/// Everything the node needs to know at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_id: u32,
    /// New at every boot, so the gateway can tell a reboot from a replay.
    pub boot_id: u32,
    pub firmware: FirmwareVersion,
    pub report_interval_s: u32,
    pub heartbeat_interval_s: u32,
    /// The channels this node reports on (announced in `Hello`).
    pub sensors: Vec<SensorInfo, MAX_SENSORS>,
    pub backoff: Backoff,
}

/// What the firmware should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// Send this frame now.
    Send(Frame),
    /// Take a measurement of every sensor and pass it to [`Node::readings`].
    Measure,
    /// Measure the supply voltage and pass it to [`Node::heartbeat`].
    Heartbeat,
    /// Nothing is due before `until`; wait for that or for an incoming frame.
    Idle { until: Millis },
}

/// A side effect of a command that only the firmware can carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Blink the LED until this time.
    Identify {
        until: Millis,
    },
    /// Reboot once the reply has been sent.
    Reboot,
}

/// The node's answer to an incoming frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub frame: Option<Frame>,
    pub effect: Effect,
}

impl Reply {
    const NONE: Reply = Reply {
        frame: None,
        effect: Effect::None,
    };
}

/// The node's protocol state.
#[derive(Debug)]
pub struct Node {
    node_id: u32,
    boot_id: u32,
    firmware: FirmwareVersion,
    sensors: Vec<SensorInfo, MAX_SENSORS>,
    next_seq: u32,
    report_interval_ms: Millis,
    heartbeat_interval_ms: Millis,
    hello_due: bool,
    next_measure_at: Millis,
    next_heartbeat_at: Millis,
    queue: UplinkQueue<QUEUE_LEN>,
    /// The last command carried out, so a retransmitted command is acknowledged, not repeated.
    last_command: Option<(FrameRef, AckStatus)>,
}

impl Node {
    /// A node that has just booted: `Hello` is due, then a first measurement.
    pub fn new(config: NodeConfig, now: Millis) -> Self {
        let report_interval_ms = secs_to_ms(config.report_interval_s.max(1));
        let heartbeat_interval_ms = secs_to_ms(config.heartbeat_interval_s.max(1));
        Node {
            node_id: config.node_id,
            boot_id: config.boot_id,
            firmware: config.firmware,
            sensors: config.sensors,
            next_seq: 0,
            report_interval_ms,
            heartbeat_interval_ms,
            hello_due: true,
            next_measure_at: now,
            next_heartbeat_at: now.saturating_add(heartbeat_interval_ms),
            queue: UplinkQueue::new(config.backoff),
            last_command: None,
        }
    }

    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    pub fn boot_id(&self) -> u32 {
        self.boot_id
    }

    pub fn report_interval_s(&self) -> u32 {
        (self.report_interval_ms / 1000) as u32
    }

    /// Readings dropped since boot (queue overflow or refused by the gateway).
    pub fn readings_dropped(&self) -> u32 {
        self.queue.dropped()
    }

    /// Readings waiting for the gateway's `Ack`.
    pub fn unacknowledged(&self) -> usize {
        self.queue.len()
    }

    /// Tells the node that its `Readings` frame `seq` went on air at `now` (later than asked,
    /// on a duty-cycled radio): its retransmission backoff restarts from then, plus `jitter_ms`.
    pub fn transmitted(&mut self, seq: u32, now: Millis, jitter_ms: Millis) {
        self.queue.transmitted(seq, now, jitter_ms);
    }

    /// The next thing to do. Call again after doing it, until it answers [`Poll::Idle`].
    pub fn poll(&mut self, now: Millis) -> Poll {
        if self.hello_due {
            self.hello_due = false;
            return Poll::Send(self.hello());
        }
        if now >= self.next_heartbeat_at {
            return Poll::Heartbeat;
        }
        if now >= self.next_measure_at {
            return Poll::Measure;
        }
        let header = |seq| Header::new(self.node_id, self.boot_id, seq);
        if let Some(pending) = self.queue.next_due(now) {
            return Poll::Send(Frame::new(
                header(pending.seq),
                Body::Readings(pending.readings.clone()),
            ));
        }
        let mut until = self.next_heartbeat_at.min(self.next_measure_at);
        if let Some(due) = self.queue.earliest_due() {
            until = until.min(due);
        }
        Poll::Idle { until }
    }

    /// The `Readings` frame for a measurement just taken; it is queued until acknowledged.
    pub fn readings(&mut self, readings: Readings, now: Millis) -> Frame {
        self.next_measure_at = next_tick(self.next_measure_at, self.report_interval_ms, now);
        let header = self.next_header();
        self.queue.push(header.seq, readings.clone(), now);
        Frame::new(header, Body::Readings(readings))
    }

    /// The `Heartbeat` frame, given the supply voltage just measured.
    pub fn heartbeat(&mut self, supply_mv: u16, now: Millis) -> Frame {
        self.next_heartbeat_at = next_tick(self.next_heartbeat_at, self.heartbeat_interval_ms, now);
        let body = Heartbeat {
            battery_mv: supply_mv,
            uptime_s: (now / 1000).min(u32::MAX as u64) as u32,
            readings_dropped: self.queue.dropped(),
        };
        Frame::new(self.next_header(), Body::Heartbeat(body))
    }

    /// Handles a frame from the gateway. Frames addressed to another node are ignored.
    pub fn on_frame(&mut self, frame: &Frame, now: Millis) -> Reply {
        if frame.header.node_id != self.node_id {
            return Reply::NONE;
        }
        match &frame.body {
            Body::Ack(ack) => {
                self.on_ack(ack, now);
                Reply::NONE
            }
            Body::Command(command) => self.on_command(frame.header.frame_ref(), command, now),
            _ => Reply::NONE,
        }
    }

    /// Handles bytes that did not decode. A command this firmware cannot read (a newer kind or
    /// body) is answered with `Ack Rejected(Unsupported)`, so the gateway does not wait for it.
    pub fn on_frame_error(&mut self, error: &FrameError) -> Reply {
        let unsupported = match error {
            FrameError::Body { kind, header } => (*kind == FrameKind::Command).then_some(*header),
            FrameError::UnknownKind {
                header: Some(header),
                ..
            } => Some(*header),
            _ => None,
        };
        match unsupported {
            Some(header) if header.node_id == self.node_id => Reply {
                frame: Some(self.ack(Ack::rejected(header.frame_ref(), NackReason::Unsupported))),
                effect: Effect::None,
            },
            _ => Reply::NONE,
        }
    }

    fn on_ack(&mut self, ack: &Ack, now: Millis) {
        if ack.of.boot_id != self.boot_id {
            return;
        }
        let seq = ack.of.seq;
        match ack.status {
            AckStatus::Accepted => {
                self.queue.ack(seq);
            }
            AckStatus::Rejected(NackReason::Busy | NackReason::StorageFull) => {
                self.queue
                    .defer(seq, now.saturating_add(self.report_interval_ms));
            }
            AckStatus::Rejected(NackReason::UnknownNode) => {
                self.hello_due = true;
                self.queue.make_all_due(now);
            }
            AckStatus::Rejected(_) => {
                self.queue.reject(seq);
            }
        }
    }

    fn on_command(&mut self, of: FrameRef, command: &Command, now: Millis) -> Reply {
        if let Some((done, status)) = self.last_command
            && done == of
        {
            let ack = Ack { of, status };
            return Reply {
                frame: Some(self.ack(ack)),
                effect: Effect::None,
            };
        }
        let (status, effect) = match *command {
            Command::SetReportInterval { seconds } => {
                if seconds == 0 || seconds > MAX_REPORT_INTERVAL_S {
                    (
                        AckStatus::Rejected(NackReason::InvalidArgument),
                        Effect::None,
                    )
                } else {
                    self.report_interval_ms = secs_to_ms(seconds);
                    self.next_measure_at = now.saturating_add(self.report_interval_ms);
                    (AckStatus::Accepted, Effect::None)
                }
            }
            Command::Identify { seconds } => (
                AckStatus::Accepted,
                Effect::Identify {
                    until: now.saturating_add(secs_to_ms(u32::from(seconds))),
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
            frame: Some(self.ack(Ack { of, status })),
            effect,
        }
    }

    fn hello(&mut self) -> Frame {
        let body = Hello {
            firmware: self.firmware,
            report_interval_s: self.report_interval_s(),
            sensors: self.sensors.clone(),
        };
        Frame::new(self.next_header(), Body::Hello(body))
    }

    fn ack(&mut self, ack: Ack) -> Frame {
        Frame::new(self.next_header(), Body::Ack(ack))
    }

    fn next_header(&mut self) -> Header {
        let header = Header::new(self.node_id, self.boot_id, self.next_seq);
        self.next_seq = self.next_seq.wrapping_add(1);
        header
    }
}

fn secs_to_ms(seconds: u32) -> Millis {
    Millis::from(seconds) * 1000
}

/// The next periodic deadline: keeps the cadence, but never schedules into the past after a
/// long stall (no burst of catch-up measurements).
fn next_tick(previous: Millis, period: Millis, now: Millis) -> Millis {
    let next = previous.saturating_add(period);
    if next <= now {
        now.saturating_add(period)
    } else {
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorgate_wire::{Quantity, Reading, Unit};

    const ME: u32 = 0x00C0_FFEE;
    const BOOT: u32 = 77;

    fn config() -> NodeConfig {
        let mut sensors = Vec::new();
        sensors
            .push(SensorInfo {
                channel: 0,
                quantity: Quantity::Temperature,
                unit: Unit::DegreeCelsius,
            })
            .unwrap();
        NodeConfig {
            node_id: ME,
            boot_id: BOOT,
            firmware: FirmwareVersion {
                major: 0,
                minor: 1,
                patch: 0,
            },
            report_interval_s: 10,
            heartbeat_interval_s: 60,
            sensors,
            backoff: Backoff {
                first_ms: 2_000,
                max_ms: 8_000,
            },
        }
    }

    fn sample(centi: i32) -> Readings {
        Readings::from_slice(&[Reading::new(0, centi, -2)]).unwrap()
    }

    fn send(poll: Poll) -> Frame {
        match poll {
            Poll::Send(frame) => frame,
            other => panic!("expected a frame to send, got {other:?}"),
        }
    }

    fn gateway(seq: u32, body: Body) -> Frame {
        Frame::new(Header::new(ME, 0xBEEF, seq), body)
    }

    fn accepted(seq: u32) -> Frame {
        gateway(
            900 + seq,
            Body::Ack(Ack::accepted(FrameRef { boot_id: BOOT, seq })),
        )
    }

    /// Boots a node and takes it through Hello and the first Readings (seq 1).
    fn booted() -> Node {
        let mut node = Node::new(config(), 0);
        send(node.poll(0));
        assert_eq!(node.poll(0), Poll::Measure);
        node.readings(sample(2100), 0);
        node
    }

    #[test]
    fn boot_sends_hello_with_seq_zero_then_asks_for_a_measurement() {
        let mut node = Node::new(config(), 0);
        let hello = send(node.poll(0));
        assert_eq!(hello.header, Header::new(ME, BOOT, 0));
        match hello.body {
            Body::Hello(h) => {
                assert_eq!(h.report_interval_s, 10);
                assert_eq!(h.sensors.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(node.poll(0), Poll::Measure);
        let readings = node.readings(sample(2100), 0);
        assert_eq!(readings.header.seq, 1);
        assert_eq!(node.unacknowledged(), 1);
    }

    #[test]
    fn readings_follow_the_interval_and_idle_names_the_next_deadline() {
        let mut node = booted();
        assert_eq!(
            node.poll(1_000),
            Poll::Idle { until: 2_000 },
            "retransmit first"
        );
        node.on_frame(&accepted(1), 1_000);
        assert_eq!(node.poll(1_000), Poll::Idle { until: 10_000 });
        assert_eq!(node.poll(10_000), Poll::Measure);
        let f = node.readings(sample(2200), 10_000);
        assert_eq!(f.header.seq, 2);
        assert_eq!(node.poll(10_001), Poll::Idle { until: 12_000 });
    }

    #[test]
    fn an_unacknowledged_reading_is_resent_with_the_same_boot_id_and_seq_until_acked() {
        let mut node = booted();
        let first = send(node.poll(2_000));
        assert_eq!(first.header, Header::new(ME, BOOT, 1));
        assert_eq!(first.body, Body::Readings(sample(2100)));
        // Backoff 2 s then 4 s: next retransmission at 6 s.
        assert_eq!(node.poll(2_001), Poll::Idle { until: 6_000 });
        let second = send(node.poll(6_000));
        assert_eq!(second.header, first.header);
        node.on_frame(&accepted(1), 6_100);
        assert_eq!(node.unacknowledged(), 0);
        assert_eq!(node.poll(6_200), Poll::Idle { until: 10_000 });
    }

    #[test]
    fn an_ack_for_another_boot_or_node_changes_nothing() {
        let mut node = booted();
        let stale = gateway(
            5,
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: BOOT + 1,
                seq: 1,
            })),
        );
        node.on_frame(&stale, 100);
        let mut other = accepted(1);
        other.header.node_id = ME + 1;
        node.on_frame(&other, 100);
        assert_eq!(node.unacknowledged(), 1);
    }

    #[test]
    fn the_queue_drops_the_oldest_only_when_full_and_heartbeat_reports_it() {
        let mut node = Node::new(config(), 0);
        send(node.poll(0));
        for i in 0..QUEUE_LEN as u64 + 3 {
            node.readings(sample(i as i32), i * 10_000);
        }
        assert_eq!(node.readings_dropped(), 3);
        assert_eq!(node.unacknowledged(), QUEUE_LEN);
        match node.heartbeat(4_950, 200_000).body {
            Body::Heartbeat(hb) => {
                assert_eq!(hb.readings_dropped, 3);
                assert_eq!(hb.uptime_s, 200);
                assert_eq!(hb.battery_mv, 4_950);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heartbeat_is_asked_for_at_its_interval() {
        let mut node = booted();
        node.on_frame(&accepted(1), 0);
        assert_eq!(node.poll(60_000), Poll::Heartbeat);
        node.heartbeat(5_000, 60_000);
        assert_eq!(node.poll(60_000), Poll::Measure);
    }

    #[test]
    fn set_report_interval_is_acked_and_reschedules_measurements() {
        let mut node = booted();
        let cmd = gateway(3, Body::Command(Command::SetReportInterval { seconds: 30 }));
        let reply = node.on_frame(&cmd, 1_000);
        let ack = reply.frame.unwrap();
        assert_eq!(ack.header.node_id, ME);
        assert_eq!(ack.header.seq, 2);
        assert_eq!(
            ack.body,
            Body::Ack(Ack::accepted(FrameRef {
                boot_id: 0xBEEF,
                seq: 3
            }))
        );
        assert_eq!(reply.effect, Effect::None);
        assert_eq!(node.report_interval_s(), 30);
        node.on_frame(&accepted(1), 1_000);
        assert_eq!(node.poll(1_000), Poll::Idle { until: 31_000 });
    }

    #[test]
    fn an_invalid_interval_is_refused_with_invalid_argument() {
        let mut node = booted();
        for seconds in [0, MAX_REPORT_INTERVAL_S + 1] {
            let cmd = gateway(
                seconds,
                Body::Command(Command::SetReportInterval { seconds }),
            );
            let reply = node.on_frame(&cmd, 0);
            match reply.frame.unwrap().body {
                Body::Ack(a) => {
                    assert_eq!(a.status, AckStatus::Rejected(NackReason::InvalidArgument))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(node.report_interval_s(), 10);
    }

    #[test]
    fn identify_and_reboot_are_acked_before_their_effect() {
        let mut node = booted();
        let reply = node.on_frame(
            &gateway(1, Body::Command(Command::Identify { seconds: 5 })),
            1_000,
        );
        assert_eq!(reply.effect, Effect::Identify { until: 6_000 });
        assert!(
            matches!(reply.frame.unwrap().body, Body::Ack(a) if a.status == AckStatus::Accepted)
        );
        let reply = node.on_frame(&gateway(2, Body::Command(Command::Reboot)), 1_000);
        assert_eq!(reply.effect, Effect::Reboot);
        assert!(reply.frame.is_some());
    }

    #[test]
    fn a_retransmitted_command_is_acked_again_but_not_repeated() {
        let mut node = booted();
        let cmd = gateway(4, Body::Command(Command::Reboot));
        assert_eq!(node.on_frame(&cmd, 0).effect, Effect::Reboot);
        let again = node.on_frame(&cmd, 10);
        assert_eq!(again.effect, Effect::None);
        assert!(matches!(again.frame.unwrap().body, Body::Ack(a) if a.of.seq == 4));
    }

    #[test]
    fn send_hello_and_unknown_node_make_hello_due_again() {
        let mut node = booted();
        node.on_frame(&gateway(1, Body::Command(Command::SendHello)), 0);
        assert!(matches!(send(node.poll(0)).body, Body::Hello(_)));
        let nack = Ack::rejected(
            FrameRef {
                boot_id: BOOT,
                seq: 1,
            },
            NackReason::UnknownNode,
        );
        node.on_frame(&gateway(2, Body::Ack(nack)), 500);
        assert!(matches!(send(node.poll(500)).body, Body::Hello(_)));
        // The reading is resent right after the Hello, not after its backoff.
        assert_eq!(send(node.poll(500)).header.seq, 1);
    }

    #[test]
    fn busy_postpones_and_a_permanent_refusal_drops_and_counts() {
        let mut node = booted();
        let busy = Ack::rejected(
            FrameRef {
                boot_id: BOOT,
                seq: 1,
            },
            NackReason::StorageFull,
        );
        node.on_frame(&gateway(1, Body::Ack(busy)), 500);
        assert_eq!(node.poll(2_000), Poll::Idle { until: 10_000 });
        let refused = Ack::rejected(
            FrameRef {
                boot_id: BOOT,
                seq: 1,
            },
            NackReason::InvalidArgument,
        );
        node.on_frame(&gateway(2, Body::Ack(refused)), 600);
        assert_eq!(node.unacknowledged(), 0);
        assert_eq!(node.readings_dropped(), 1);
    }

    #[test]
    fn an_undecodable_command_gets_a_negative_ack_not_silence() {
        let mut node = booted();
        let header = Header::new(ME, 0xBEEF, 42);
        let reply = node.on_frame_error(&FrameError::Body {
            kind: FrameKind::Command,
            header,
        });
        match reply.frame.unwrap().body {
            Body::Ack(a) => {
                assert_eq!(
                    a.of,
                    FrameRef {
                        boot_id: 0xBEEF,
                        seq: 42
                    }
                );
                assert_eq!(a.status, AckStatus::Rejected(NackReason::Unsupported));
            }
            other => panic!("{other:?}"),
        }
        let unknown = FrameError::UnknownKind {
            kind: 99,
            header: Some(header),
        };
        assert!(node.on_frame_error(&unknown).frame.is_some());
        // Noise and frames for other nodes get no answer.
        assert_eq!(node.on_frame_error(&FrameError::Crc), Reply::NONE);
        let theirs = Header::new(ME + 1, 1, 1);
        let other = FrameError::Body {
            kind: FrameKind::Command,
            header: theirs,
        };
        assert_eq!(node.on_frame_error(&other), Reply::NONE);
    }

    #[test]
    fn a_long_stall_does_not_cause_a_burst_of_measurements() {
        let mut node = booted();
        node.on_frame(&accepted(1), 0);
        assert_eq!(node.poll(55_000), Poll::Measure);
        node.readings(sample(1), 55_000);
        assert!(matches!(node.poll(55_001), Poll::Idle { until } if until > 55_001));
    }
}
