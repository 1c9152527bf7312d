//! Node availability, the gateway status and the watchdog's liveness check, on tokio's paused
//! clock: minutes of device time pass in milliseconds, and nothing waits on real time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sensorgate::broker::{Broker, BrokerHandle, InternalMessage};
use sensorgate::health::{GatewayStatus, HealthTask, Nodes, PipelineProbe, UplinkStatus};
use sensorgate::registry::{NodeRecord, Registry};
use sensorgate::service::{Liveness, supervise};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

async fn broker() -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "gateway-id = \"pi\"\ndata-dir = {:?}\n[broker]\npersistence = false\n[[broker.listener]]\nbind = \"127.0.0.1:0\"\n[availability]\ndefault-interval = \"10s\"\nmissed-intervals = 3\n",
        dir.path().display().to_string()
    );
    let config = sensorgate::config::parse(&text, "t.toml", None).unwrap();
    (Broker::start(&config).await.unwrap(), dir)
}

async fn next(rx: &mut mpsc::Receiver<InternalMessage>, topic: &str) -> String {
    loop {
        let m = rx.recv().await.expect("broker running");
        if m.topic == topic {
            return String::from_utf8_lossy(&m.payload).into_owned();
        }
    }
}

fn health(
    handle: BrokerHandle,
    nodes: watch::Receiver<Arc<Nodes>>,
    base_ms: u64,
) -> (
    HealthTask,
    watch::Receiver<Arc<GatewayStatus>>,
    watch::Sender<UplinkStatus>,
) {
    let config = sensorgate::config::parse(
        "[availability]\ndefault-interval = \"10s\"\nmissed-intervals = 3\n",
        "t.toml",
        None,
    )
    .unwrap();
    let start = Instant::now();
    let (status_tx, status_rx) = watch::channel(Arc::default());
    let (uplink_tx, uplink_rx) = watch::channel(UplinkStatus::not_configured());
    let task = HealthTask {
        gateway: "pi".into(),
        broker: handle,
        nodes,
        ports: vec![],
        mapping: Arc::new(config.mapping.clone()),
        config: config.device.clone(),
        refresh: Duration::from_secs(10),
        status: status_tx,
        clock: Arc::new(move || base_ms + start.elapsed().as_millis() as u64),
        uplink: uplink_rx,
    };
    (task, status_rx, uplink_tx)
}

#[tokio::test(start_paused = true)]
async fn a_node_goes_offline_after_three_missed_intervals_and_the_status_follows() {
    let (broker, _dir) = broker().await;
    let mut seen = broker
        .handle()
        .subscribe("sensorgate/pi/#", 256)
        .await
        .unwrap();
    let base = 1_764_000_000_000;
    let mut nodes = Nodes::new();
    nodes.insert(
        "7".into(),
        NodeRecord {
            port: "usb0".into(),
            last_seen_ms: base,
            ..Default::default()
        },
    );
    let (_nodes_tx, nodes_rx) = watch::channel(Arc::new(nodes));
    let (task, status, uplink) = health(broker.handle(), nodes_rx, base);
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let running = tokio::spawn(task.run(stop_rx));

    let availability = "sensorgate/pi/nodes/7/availability";
    assert_eq!(next(&mut seen, availability).await, "online");
    let first: GatewayStatus =
        serde_json::from_str(&next(&mut seen, "sensorgate/pi/status").await).unwrap();
    assert_eq!((first.nodes_online, first.nodes_total), (1, 1));
    assert_eq!(first.state, "online");

    assert_eq!(next(&mut seen, availability).await, "offline");
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(30) && took <= Duration::from_secs(32),
        "offline after {took:?}"
    );
    let changed: GatewayStatus =
        serde_json::from_str(&next(&mut seen, "sensorgate/pi/status").await).unwrap();
    assert_eq!((changed.nodes_online, changed.nodes_total), (0, 1));
    assert_eq!(
        status.borrow().summary(),
        "0/1 nodes online, 0/0 ports open, uplink not-configured"
    );

    // The uplink stage reports a change: the status follows at once.
    let before = Instant::now();
    uplink.send_replace(UplinkStatus {
        state: "connected".into(),
        outbox: Some(4),
        oldest_age_s: Some(12),
    });
    let reported: GatewayStatus =
        serde_json::from_str(&next(&mut seen, "sensorgate/pi/status").await).unwrap();
    assert_eq!(reported.uplink.state, "connected");
    assert!(
        before.elapsed() < Duration::from_millis(1),
        "no tick waited for"
    );

    stop.send(true).unwrap();
    running.await.unwrap();
    let last: GatewayStatus =
        serde_json::from_str(&next(&mut seen, "sensorgate/pi/status").await).unwrap();
    assert_eq!(last.state, "offline", "a clean stop says so");
}

#[tokio::test(start_paused = true)]
async fn a_node_heard_again_comes_back_online_at_once() {
    let (broker, _dir) = broker().await;
    let mut seen = broker
        .handle()
        .subscribe("sensorgate/pi/nodes/#", 64)
        .await
        .unwrap();
    let base = 1_764_000_000_000;
    let record = |last_seen_ms| {
        let mut nodes = Nodes::new();
        nodes.insert(
            "7".into(),
            NodeRecord {
                last_seen_ms,
                interval_s: Some(60),
                ..Default::default()
            },
        );
        Arc::new(nodes)
    };
    let (nodes_tx, nodes_rx) = watch::channel(record(base - 3_600_000));
    let (task, _status, _uplink) = health(broker.handle(), nodes_rx, base);
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(task.run(stop_rx));
    let topic = "sensorgate/pi/nodes/7/availability";
    assert_eq!(
        next(&mut seen, topic).await,
        "offline",
        "last heard an hour ago"
    );
    let before = Instant::now();
    nodes_tx.send(record(base)).unwrap();
    assert_eq!(next(&mut seen, topic).await, "online");
    assert!(
        before.elapsed() < Duration::from_millis(1),
        "no tick waited for"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_gateway_publishes_its_status_once_and_then_leaves_it_alone() {
    let (broker, _dir) = broker().await;
    let mut seen = broker
        .handle()
        .subscribe("sensorgate/pi/#", 64)
        .await
        .unwrap();
    let (_nodes_tx, nodes_rx) = watch::channel(Arc::new(Nodes::new()));
    let (task, _status, _uplink) = health(broker.handle(), nodes_rx, 1_764_000_000_000);
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(task.run(stop_rx));
    next(&mut seen, "sensorgate/pi/status").await;
    // Twelve refresh intervals of nothing happening.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        seen.try_recv().is_err(),
        "an unchanged status is not republished"
    );
}

/// What `supervise` would have sent to systemd, with the (paused) time it was sent.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(Duration, String)>>>);

impl Recorder {
    fn pings(&self) -> Vec<Duration> {
        let sent = self.0.lock().unwrap();
        sent.iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(t, _)| *t)
            .collect()
    }
    fn statuses(&self) -> Vec<String> {
        let sent = self.0.lock().unwrap();
        sent.iter()
            .flat_map(|(_, m)| {
                m.lines()
                    .filter_map(|l| l.strip_prefix("STATUS="))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

async fn watchdog(handle: BrokerHandle, probe: PipelineProbe) -> (Recorder, watch::Sender<bool>) {
    let liveness = Liveness::new(handle, probe, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    let recorder = Recorder::default();
    let record = recorder.clone();
    let start = Instant::now();
    let (_status_tx, status_rx) = watch::channel(Arc::new(GatewayStatus::default()));
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let _keep = _status_tx;
        supervise(
            liveness,
            Some(Duration::from_secs(20)),
            status_rx,
            move |m| {
                record
                    .0
                    .lock()
                    .unwrap()
                    .push((start.elapsed(), m.to_string()))
            },
            stop_rx,
        )
        .await
    });
    (recorder, stop)
}

#[tokio::test(start_paused = true)]
async fn watchdog_pings_stop_when_the_pipeline_stops_ticking() {
    let (broker, _dir) = broker().await;
    let probe = PipelineProbe::default();
    let (recorder, _stop) = watchdog(broker.handle(), probe.clone()).await;
    // The pipeline ticks every 10 s for a minute, then wedges.
    let registry = Registry::default();
    for _ in 0..6 {
        probe.tick(&registry);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(120)).await;

    let pings = recorder.pings();
    assert!(pings.len() >= 6, "pinged while healthy: {pings:?}");
    let last = *pings.last().unwrap();
    // Last tick at 50 s; the stall limit is 30 s; checks run every 10 s (WatchdogSec / 2).
    assert!(
        last <= Duration::from_secs(80) && last >= Duration::from_secs(50),
        "pings must stop once the pipeline stalls; last at {last:?}"
    );
    assert!(
        recorder
            .statuses()
            .iter()
            .any(|s| s.starts_with("unhealthy: the pipeline has not ticked")),
        "{:?}",
        recorder.statuses()
    );
}

#[tokio::test(start_paused = true)]
async fn watchdog_pings_stop_when_the_broker_router_is_gone() {
    let (broker, _dir) = broker().await;
    let probe = PipelineProbe::default();
    let (recorder, _stop) = watchdog(broker.handle(), probe.clone()).await;
    let ticking = tokio::spawn({
        let probe = probe.clone();
        async move {
            let registry = Registry::default();
            loop {
                probe.tick(&registry);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(35)).await;
    let before = recorder.pings().len();
    assert!(before >= 3, "pinged while healthy");
    broker.shutdown().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(recorder.pings().len(), before, "no ping without a router");
    assert!(
        recorder
            .statuses()
            .iter()
            .any(|s| s.contains("broker has stopped"))
    );
    ticking.abort();
}
