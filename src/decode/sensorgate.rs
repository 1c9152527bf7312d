//! The `sensorgate` protocol: COBS-framed, CRC-checked frames of the shared `sensorgate-wire`
//! crate, the same code the node firmware encodes with.

use sensorgate_wire::{self as wire, Accumulator, Body as WireBody, Frame, FrameError};

use super::{
    Body, Decoded, Decoder, Fault, FrameId, LinkQuality, NodeCommand, Observation, Reading,
    SensorInfo,
};

#[derive(Default)]
pub struct SensorgateDecoder {
    acc: Accumulator,
}

impl SensorgateDecoder {
    pub fn new() -> Self {
        SensorgateDecoder {
            acc: Accumulator::new(),
        }
    }
}

fn fault(e: &FrameError) -> Fault {
    match e {
        FrameError::Crc => Fault::Crc,
        FrameError::Empty
        | FrameError::Oversize
        | FrameError::Unterminated
        | FrameError::Cobs
        | FrameError::Truncated => Fault::Framing,
        FrameError::UnknownVersion(_)
        | FrameError::UnknownKind { .. }
        | FrameError::Header
        | FrameError::Body { .. } => Fault::Undecodable,
    }
}

/// Converts a decoded frame; `None` for frames a gateway does not act on (its own kinds).
pub fn observation(
    frame: &Frame,
    link: Option<LinkQuality>,
) -> Result<Option<Observation>, FrameError> {
    let h = frame.header;
    let frame_id = Some(FrameId {
        boot_id: h.boot_id,
        seq: h.seq,
    });
    let body = match &frame.body {
        WireBody::Readings(r) => Body::Readings(
            r.readings
                .iter()
                .map(|x| Reading {
                    channel: u16::from(x.channel),
                    quantity: None,
                    unit: None,
                    value: x.value.to_f64(),
                    decimals: (x.value.exponent < 0).then(|| x.value.exponent.unsigned_abs()),
                })
                .collect(),
        ),
        WireBody::Hello(hello) => Body::Hello {
            firmware: Some(hello.firmware.to_string()),
            sensors: hello
                .sensors
                .iter()
                .map(|s| SensorInfo {
                    channel: u16::from(s.channel),
                    quantity: s.quantity.name().to_string(),
                    unit: Some(s.unit.symbol().to_string()).filter(|u| !u.is_empty()),
                    name: None,
                })
                .collect(),
            complete: true,
            interval_s: Some(hello.report_interval_s).filter(|&s| s > 0),
        },
        WireBody::Heartbeat(hb) => Body::Heartbeat {
            battery_mv: Some(u32::from(hb.battery_mv)).filter(|&v| v > 0),
            battery_pct: None,
            uptime_s: Some(hb.uptime_s),
            dropped: Some(hb.readings_dropped),
        },
        WireBody::Log(log) => Body::Log {
            level: format!("{:?}", log.level).to_lowercase(),
            text: log.text.to_string(),
        },
        WireBody::Ack(ack) => Body::CommandAck {
            of: FrameId {
                boot_id: ack.of.boot_id,
                seq: ack.of.seq,
            },
            accepted: matches!(ack.status, wire::AckStatus::Accepted),
            reason: match ack.status {
                wire::AckStatus::Accepted => None,
                wire::AckStatus::Rejected(r) => Some(r.name().to_string()),
            },
        },
        WireBody::Relayed(relayed) => {
            let inner = relayed.inner_frame()?;
            let link = LinkQuality {
                rssi_dbm: i32::from(relayed.link.rssi_dbm),
                snr_db: relayed.link.snr_db,
            };
            return observation(&inner, Some(link));
        }
        // Gateway-to-node kinds arriving from a node: nothing to do with them.
        WireBody::Command(_) => return Ok(None),
    };
    Ok(Some(Observation {
        node: h.node_id.to_string(),
        frame: frame_id,
        link,
        body,
    }))
}

impl Decoder for SensorgateDecoder {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        for d in self.acc.feed_iter(bytes) {
            out.push(match d.result {
                Ok(frame) => match observation(&frame, None) {
                    Ok(Some(obs)) => Decoded::Observation {
                        obs,
                        bytes: d.bytes,
                    },
                    Ok(None) => Decoded::Ignored { bytes: d.bytes },
                    Err(e) => Decoded::Error {
                        fault: fault(&e),
                        detail: format!("relayed frame: {e}"),
                        bytes: d.bytes,
                    },
                },
                // A lone delimiter is how senders flush a receiver; not an error.
                Err(FrameError::Empty) => Decoded::Ignored { bytes: d.bytes },
                Err(e) => Decoded::Error {
                    fault: fault(&e),
                    detail: e.to_string(),
                    bytes: d.bytes,
                },
            });
        }
    }

    fn finish(&mut self, out: &mut Vec<Decoded>) {
        if let Some((e, bytes)) = self.acc.finish() {
            out.push(Decoded::Error {
                fault: fault(&e),
                detail: e.to_string(),
                bytes,
            });
        }
    }

    fn pending(&self) -> usize {
        self.acc.pending()
    }

    fn ack(&self, node: &str, frame: FrameId) -> Option<Vec<u8>> {
        let node_id: u32 = node.parse().ok()?;
        let ack = wire::Ack::accepted(wire::FrameRef {
            boot_id: frame.boot_id,
            seq: frame.seq,
        });
        // The gateway's own boot id and sequence do not matter for acks; zero marks them.
        let f = Frame::new(wire::Header::new(node_id, 0, 0), WireBody::Ack(ack));
        let mut buf = [0u8; wire::MAX_FRAME];
        wire::encode(&f, &mut buf).ok().map(<[u8]>::to_vec)
    }

    fn command(&self, node: &str, id: FrameId, command: NodeCommand) -> Option<Vec<u8>> {
        let node_id: u32 = node.parse().ok()?;
        let command = match command {
            NodeCommand::SetInterval(seconds) => wire::Command::SetReportInterval { seconds },
            NodeCommand::Identify(seconds) => wire::Command::Identify { seconds },
            NodeCommand::Reboot => wire::Command::Reboot,
            NodeCommand::SendHello => wire::Command::SendHello,
        };
        let f = Frame::new(
            wire::Header::new(node_id, id.boot_id, id.seq),
            WireBody::Command(command),
        );
        let mut buf = [0u8; wire::MAX_FRAME];
        wire::encode(&f, &mut buf).ok().map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{Header, Readings};

    fn readings_frame(node: u32, seq: u32) -> Vec<u8> {
        let r = Readings::from_slice(&[
            wire::Reading::new(0, 2150, -2),
            wire::Reading::new(1, 48, 0),
        ])
        .unwrap();
        let f = Frame::new(Header::new(node, 7, seq), WireBody::Readings(r));
        let mut buf = [0u8; wire::MAX_FRAME];
        wire::encode(&f, &mut buf).unwrap().to_vec()
    }

    #[test]
    fn a_readings_frame_becomes_an_observation_with_its_decimals() {
        let mut d = SensorgateDecoder::new();
        let mut out = Vec::new();
        let bytes = readings_frame(17, 3);
        d.feed(&bytes, &mut out);
        let [Decoded::Observation { obs, bytes: n }] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(*n, bytes.len());
        assert_eq!(obs.node, "17");
        assert_eq!(obs.frame, Some(FrameId { boot_id: 7, seq: 3 }));
        let Body::Readings(r) = &obs.body else {
            panic!()
        };
        assert_eq!(r[0].value, 21.5);
        assert_eq!(r[0].decimals, Some(2));
        assert_eq!(r[1].decimals, None);
    }

    #[test]
    fn every_byte_is_accounted_for_across_garbage_and_split_frames() {
        let mut stream = b"\x01\x02garbage\x00".to_vec();
        stream.extend(readings_frame(1, 1));
        let mut corrupt = readings_frame(1, 2);
        corrupt[4] ^= 0x40;
        stream.extend(&corrupt);
        stream.extend(&readings_frame(1, 3)[..5]);
        let mut d = SensorgateDecoder::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(3) {
            d.feed(chunk, &mut out);
        }
        let accounted: usize = out.iter().map(Decoded::bytes).sum();
        assert_eq!(accounted + d.pending(), stream.len());
        let frames = out
            .iter()
            .filter(|o| matches!(o, Decoded::Observation { .. }))
            .count();
        let errors = out
            .iter()
            .filter(|o| matches!(o, Decoded::Error { .. }))
            .count();
        assert_eq!((frames, errors), (1, 2));
        d.finish(&mut out);
        assert_eq!(out.iter().map(Decoded::bytes).sum::<usize>(), stream.len());
    }

    #[test]
    fn an_ack_decodes_back_as_an_ack_for_the_frame() {
        let d = SensorgateDecoder::new();
        let bytes = d
            .ack("17", FrameId { boot_id: 7, seq: 3 })
            .expect("numeric node");
        let mut acc = Accumulator::new();
        let got: Vec<_> = acc.feed_iter(&bytes).collect();
        let Ok(frame) = &got[0].result else {
            panic!("{got:?}")
        };
        assert_eq!(frame.header.node_id, 17);
        let WireBody::Ack(ack) = frame.body else {
            panic!()
        };
        assert_eq!((ack.of.boot_id, ack.of.seq), (7, 3));
        assert!(d.ack("kitchen", FrameId { boot_id: 0, seq: 0 }).is_none());
    }
}
