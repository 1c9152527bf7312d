//! A LoRa node, a bridge and a gateway stand-in on a simulated half-duplex channel that loses
//! every third packet, in 1 ms steps: every reading reaches the gateway (exactly once after its
//! dedupe), each only after retransmissions the lost packets made necessary, a command sent by
//! the gateway reaches the node in a listen window and its `Ack` comes back, and neither radio
//! exceeds its duty cycle.

use std::collections::{BTreeSet, VecDeque};

use sensorgate_node_core::bridge::{Bridge, BridgeConfig, BridgePoll};
use sensorgate_node_core::{
    Backoff, DutyCycle, LoraParams, Millis, Node, NodeConfig, RadioConfig, RadioNode, RadioPoll,
};
use sensorgate_wire::{
    Ack, AckStatus, Body, Command, FirmwareVersion, Frame, FrameRef, Header, LinkQuality, Reading,
    Readings, heapless,
};

const NODE: u32 = 0x17;
const BRIDGE: u32 = 0xB1D6E;
const LORA: LoraParams = LoraParams::SF7_BW125;
const WINDOW_MS: Millis = 2_000;
/// The gateway commits a reading to its outbox, then acks: a few hundred milliseconds.
const GATEWAY_ACK_DELAY_MS: Millis = 300;
const SIMULATED_MS: Millis = 20 * 60 * 1000;
const COMMAND_AT: Millis = 5 * 60 * 1000;

struct OnAir {
    from_node: bool,
    payload: heapless::Vec<u8, { sensorgate_wire::MAX_FRAME }>,
    ends_at: Millis,
    lost: bool,
}

#[derive(Default)]
struct Gateway {
    readings: BTreeSet<u32>,
    duplicates: u32,
    command_acked: bool,
    to_bridge: VecDeque<(Millis, Frame)>,
}

impl Gateway {
    fn serial_in(&mut self, frame: &Frame, now: Millis) {
        let Body::Relayed(relayed) = &frame.body else {
            return; // the bridge's own Hello and Heartbeat
        };
        assert_eq!(relayed.link.rssi_dbm, -90);
        let inner = relayed
            .inner_frame()
            .expect("the node's CRC holds end to end");
        match inner.body {
            Body::Readings(readings) => {
                // Each reading carries its number as the value.
                let number = readings.readings[0].value.mantissa as u32;
                if !self.readings.insert(number) {
                    self.duplicates += 1;
                }
                let ack = Ack::accepted(inner.header.frame_ref());
                let frame = Frame::new(Header::new(NODE, 0, 0), Body::Ack(ack));
                self.to_bridge
                    .push_back((now + GATEWAY_ACK_DELAY_MS, frame));
            }
            Body::Ack(Ack {
                of:
                    FrameRef {
                        boot_id: 0x6A7E,
                        seq: 1,
                    },
                status: AckStatus::Accepted,
            }) => self.command_acked = true,
            _ => {}
        }
    }
}

fn airtime_ms(len: usize) -> Millis {
    LORA.airtime_us(len).div_ceil(1000)
}

#[test]
fn readings_cross_a_lossy_radio_link_exactly_once_and_a_command_comes_back_acked() {
    let mut sensors = heapless::Vec::new();
    sensors
        .push(sensorgate_wire::SensorInfo {
            channel: 0,
            quantity: sensorgate_wire::Quantity::Temperature,
            unit: sensorgate_wire::Unit::DegreeCelsius,
        })
        .unwrap();
    let mut node = RadioNode::new(
        Node::new(
            NodeConfig {
                node_id: NODE,
                boot_id: 0x5EED,
                firmware: FirmwareVersion::default(),
                report_interval_s: 60,
                heartbeat_interval_s: 600,
                sensors,
                backoff: Backoff {
                    first_ms: 10_000,
                    max_ms: 60_000,
                },
            },
            0,
        ),
        RadioConfig {
            rx_window_ms: WINDOW_MS,
            ..RadioConfig::EU868
        },
    );
    let mut bridge = Bridge::new(
        BridgeConfig {
            bridge_id: BRIDGE,
            boot_id: 0xB007,
            firmware: FirmwareVersion::default(),
            lora: LORA,
            duty: DutyCycle::eu868_g1(),
            rx_window_ms: WINDOW_MS,
            turnaround_ms: 20,
            always_listening: heapless::Vec::new(),
            downlink_ttl_ms: 15 * 60 * 1000,
            heartbeat_interval_s: 60,
        },
        0,
    );
    let mut gateway = Gateway::default();
    let mut air: Vec<OnAir> = Vec::new();
    let (mut node_busy_until, mut bridge_busy_until) = (0, 0);
    let mut node_listens_until: Millis = 0;
    let (mut packets, mut node_airtime, mut bridge_airtime) = (0u32, 0, 0);
    let mut produced = 0u32;

    for now in 0..SIMULATED_MS {
        // Packets that end now arrive, if the receiver listened and the channel kept them.
        for packet in air.iter().filter(|p| p.ends_at == now) {
            if packet.from_node {
                node.transmitted(now);
                if !packet.lost && bridge_busy_until <= now {
                    let link = LinkQuality {
                        rssi_dbm: -90,
                        snr_db: 7,
                    };
                    if let Some(frame) = bridge.on_radio(&packet.payload, link, now) {
                        gateway.serial_in(&frame, now);
                    }
                }
            } else {
                bridge.transmitted(now);
                if !packet.lost && now <= node_listens_until && node_busy_until <= now {
                    node.received(&packet.payload, now);
                }
            }
        }
        air.retain(|p| p.ends_at > now);
        while gateway.to_bridge.front().is_some_and(|(at, _)| *at <= now) {
            let (_, frame) = gateway.to_bridge.pop_front().unwrap();
            bridge.on_serial(&frame, now);
        }
        if now == COMMAND_AT {
            let identify = Frame::new(
                Header::new(NODE, 0x6A7E, 1),
                Body::Command(Command::Identify { seconds: 3 }),
            );
            bridge.on_serial(&identify, now);
        }

        if node_busy_until <= now {
            node_listens_until = 0;
            match node.poll(now) {
                RadioPoll::Transmit(payload) => {
                    let ends_at = now + airtime_ms(payload.len());
                    node_airtime += LORA.airtime_us(payload.len());
                    packets += 1;
                    node_busy_until = ends_at;
                    air.push(OnAir {
                        from_node: true,
                        lost: packets % 3 == 2,
                        payload,
                        ends_at,
                    });
                }
                RadioPoll::Measure => {
                    produced += 1;
                    let value = Reading::new(0, produced as i32, -2);
                    node.readings(Readings::from_slice(&[value]).unwrap(), now);
                }
                RadioPoll::Heartbeat => node.heartbeat(3_300, now),
                RadioPoll::Listen { until } => node_listens_until = until,
                RadioPoll::Sleep { .. } => {}
            }
        }
        if bridge_busy_until <= now {
            match bridge.poll(now) {
                BridgePoll::Serial(frame) => gateway.serial_in(&frame, now),
                BridgePoll::Transmit { node_id, payload } => {
                    assert_eq!(node_id, NODE);
                    let ends_at = now + airtime_ms(payload.len());
                    bridge_airtime += LORA.airtime_us(payload.len());
                    packets += 1;
                    bridge_busy_until = ends_at;
                    air.push(OnAir {
                        from_node: false,
                        lost: packets % 3 == 2,
                        payload,
                        ends_at,
                    });
                }
                BridgePoll::Listen { .. } => {}
            }
        }
    }

    eprintln!(
        "{produced} readings, {} arrived, {} duplicates; node {:?}; bridge {:?}",
        gateway.readings.len(),
        gateway.duplicates,
        node.stats(),
        bridge.stats()
    );
    // The last reading may still be on its way; every earlier one has arrived.
    assert!(produced >= 20, "{produced} readings in 20 minutes");
    let expected: BTreeSet<u32> = (1..produced).collect();
    let missing: Vec<_> = expected.difference(&gateway.readings).collect();
    assert!(missing.is_empty(), "missing readings: {missing:?}");
    assert!(
        gateway.duplicates > 0,
        "losses made retransmissions arrive twice"
    );
    assert!(node.node().unacknowledged() <= 1);
    assert!(
        gateway.command_acked,
        "the Identify command's Ack came back"
    );
    // Neither side exceeds 1 % of the time on air (plus the initial burst).
    let budget_us = SIMULATED_MS * 10 + 3_600_000;
    assert!(node_airtime <= budget_us && bridge_airtime <= budget_us);
    assert!(bridge.stats().downlinks_sent > 0);
    assert_eq!(bridge.stats().downlinks_lost(), 0);
}
