//! A fault-injecting TCP proxy between the gateway and its upstream broker.
//!
//! It forwards whole MQTT packets (it splits each direction's byte stream at fixed-header
//! boundaries), so a fault can strike right after a given packet type: a QoS 2 PUBLISH, a
//! PUBREC, a PUBREL. The test controls it: refuse or accept new connections, cut every
//! connection now, stall (hold data, keep sockets open), reset after a byte count. Every change
//! it sees is counted in [`Seen`], which tests await instead of sleeping.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Gateway → upstream broker.
    Up,
    /// Upstream broker → gateway.
    Down,
}

/// Packets a fault can follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A PUBLISH at QoS 2.
    Publish2,
    PubRec,
    PubRel,
    PubComp,
}

impl Kind {
    fn matches(self, byte0: u8) -> bool {
        match self {
            Kind::Publish2 => byte0 >> 4 == 3 && (byte0 >> 1) & 3 == 2,
            Kind::PubRec => byte0 >> 4 == 5,
            Kind::PubRel => byte0 >> 4 == 6,
            Kind::PubComp => byte0 >> 4 == 7,
        }
    }
}

/// A one-shot fault, armed by the test and consumed when it fires.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Close the connection right after forwarding the `skip + 1`-th matching packet.
    CutAfter { dir: Dir, kind: Kind, skip: u32 },
    /// Forward `left` more bytes in `dir` (cutting a packet short if it falls inside one),
    /// then reset that connection.
    ResetAfter { dir: Dir, left: u64 },
}

/// What the proxy has done so far.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub accepted: u64,
    pub refused: u64,
    /// Faults that fired (armed cuts and resets).
    pub fired: u64,
    /// Connections ended, for any reason.
    pub closed: u64,
    /// QoS 2 PUBLISH packets forwarded upstream.
    pub publish2_up: u64,
}

struct Control {
    accepting: bool,
    faults: Vec<Fault>,
}

struct Shared {
    upstream: SocketAddr,
    control: Mutex<Control>,
    cut_all: watch::Sender<u64>,
    stall: watch::Sender<bool>,
    seen: watch::Sender<Seen>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

impl Proxy {
    /// Listens on a free loopback port; forwards to `upstream`. Starts refusing when
    /// `accepting` is false.
    pub async fn start(upstream: SocketAddr, accepting: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            control: Mutex::new(Control {
                accepting,
                faults: Vec::new(),
            }),
            cut_all: watch::channel(0).0,
            stall: watch::channel(false).0,
            seen: watch::channel(Seen::default()).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { s.serve(client).await });
            }
        });
        Proxy { addr, shared, task }
    }

    /// New connections are closed at once while refusing.
    pub fn set_accepting(&self, yes: bool) {
        self.shared.control.lock().unwrap().accepting = yes;
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.shared.cut_all.send_modify(|g| *g += 1);
    }

    /// Stops forwarding in both directions, keeping the sockets open; `false` resumes.
    pub fn stall(&self, yes: bool) {
        self.shared.stall.send_replace(yes);
    }

    /// Cuts the connection right after it forwarded the `skip + 1`-th `kind` packet in `dir`.
    pub fn cut_after(&self, dir: Dir, kind: Kind, skip: u32) {
        let mut c = self.shared.control.lock().unwrap();
        c.faults.push(Fault::CutAfter { dir, kind, skip });
    }

    /// Resets the connection once it forwarded `bytes` more bytes in `dir` from now.
    pub fn reset_after(&self, dir: Dir, bytes: u64) {
        let mut c = self.shared.control.lock().unwrap();
        c.faults.push(Fault::ResetAfter { dir, left: bytes });
    }

    pub fn seen(&self) -> Seen {
        self.shared.seen.borrow().clone()
    }

    /// Waits (at most `limit`) until what the proxy saw satisfies `ok`.
    pub async fn wait(&self, what: &str, limit: Duration, ok: impl Fn(&Seen) -> bool) -> Seen {
        let mut rx = self.shared.seen.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if ok(&s) {
                        return s.clone();
                    }
                }
                rx.changed().await.expect("proxy alive");
            }
        })
        .await;
        match waited {
            Ok(s) => s,
            Err(_) => panic!(
                "timed out after {limit:?} waiting for the proxy: {what}; saw {:?}",
                self.seen()
            ),
        }
    }
}

impl Shared {
    async fn serve(self: Arc<Self>, client: TcpStream) {
        if !self.control.lock().unwrap().accepting {
            self.seen.send_modify(|s| s.refused += 1);
            return;
        }
        let Ok(upstream) = TcpStream::connect(self.upstream).await else {
            self.seen.send_modify(|s| s.refused += 1);
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        self.seen.send_modify(|s| s.accepted += 1);
        let (kill, _) = watch::channel(false);
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let up = tokio::spawn(self.clone().pump(Dir::Up, cr, uw, kill.clone()));
        let down = tokio::spawn(self.clone().pump(Dir::Down, ur, cw, kill));
        let _ = tokio::join!(up, down);
        self.seen.send_modify(|s| s.closed += 1);
    }

    /// Forwards whole packets from `from` to `to` until either side closes or a fault fires.
    /// While stalled it keeps reading (so it notices a close) but forwards nothing.
    async fn pump(
        self: Arc<Self>,
        dir: Dir,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        kill: watch::Sender<bool>,
    ) {
        let mut killed = kill.subscribe();
        let mut cut = self.cut_all.subscribe();
        let mut stall = self.stall.subscribe();
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 16 * 1024];
        'conn: loop {
            let stalled = *stall.borrow_and_update();
            while !stalled && let Some(len) = packet_len(&buf) {
                let packet: Vec<u8> = buf.drain(..len).collect();
                match self.fault_for(dir, packet[0], len as u64) {
                    Some(Fault::ResetAfter { left, .. }) => {
                        let _ = to.write_all(&packet[..left as usize]).await;
                        let _ = to.flush().await;
                        reset(&from, &to);
                        self.seen.send_modify(|s| s.fired += 1);
                        break 'conn;
                    }
                    Some(Fault::CutAfter { .. }) => {
                        let _ = to.write_all(&packet).await;
                        let _ = to.flush().await;
                        self.count(dir, packet[0]);
                        self.seen.send_modify(|s| s.fired += 1);
                        break 'conn;
                    }
                    None => {
                        if to.write_all(&packet).await.is_err() {
                            break 'conn;
                        }
                        self.count(dir, packet[0]);
                    }
                }
            }
            tokio::select! {
                r = from.read(&mut chunk), if buf.len() < 4 * 1024 * 1024 => match r {
                    Ok(0) | Err(_) => break 'conn,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                r = stall.changed() => if r.is_err() { break 'conn },
                _ = killed.changed() => break 'conn,
                _ = cut.changed() => break 'conn,
            }
        }
        let _ = kill.send(true);
    }

    fn count(&self, dir: Dir, byte0: u8) {
        if dir == Dir::Up && Kind::Publish2.matches(byte0) {
            self.seen.send_modify(|s| s.publish2_up += 1);
        }
    }

    /// The armed fault this packet fires, if any (it is removed); counts down the others.
    fn fault_for(&self, dir: Dir, byte0: u8, len: u64) -> Option<Fault> {
        let mut c = self.control.lock().unwrap();
        let mut hit = None;
        for (i, f) in c.faults.iter_mut().enumerate() {
            match f {
                Fault::CutAfter { dir: d, kind, skip } if *d == dir && kind.matches(byte0) => {
                    if *skip == 0 {
                        hit = Some(i);
                        break;
                    }
                    *skip -= 1;
                }
                Fault::ResetAfter { dir: d, left } if *d == dir => {
                    if len >= *left {
                        hit = Some(i);
                        break;
                    }
                    *left -= len;
                }
                _ => {}
            }
        }
        hit.map(|i| c.faults.remove(i))
    }
}

/// Closes with RST rather than FIN where the OS allows (linger zero).
#[allow(deprecated)]
fn reset(from: &OwnedReadHalf, to: &OwnedWriteHalf) {
    let _ = from.as_ref().set_linger(Some(Duration::ZERO));
    let _ = to.as_ref().set_linger(Some(Duration::ZERO));
}

/// Length of the first complete MQTT packet in `buf`, if it holds one.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    let mut mult = 1usize;
    for i in 1..5 {
        let b = *buf.get(i)?;
        len += usize::from(b & 0x7f) * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            let total = i + 1 + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    // Not MQTT (more than four length bytes): pass everything through as one chunk.
    Some(buf.len())
}
