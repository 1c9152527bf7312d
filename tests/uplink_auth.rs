//! A misconfigured uplink (wrong CA, wrong password, a missing password file or client
//! certificate) says why in `UplinkStats.last_error`, keeps storing, and delivers everything
//! once fixed: by a restart with the right setting, or by the missing file appearing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Raw;
use common::upstream::{MosqOptions, Mosquitto, Sink, gateway_toml, start_gateway};

const LONG: Duration = Duration::from_secs(30);
const RULES: &str = r#"
[[upstream.out]]
filter = "sensors/#"
remote-prefix = "site/{gateway}/"
qos = 1
"#;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("tool runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the `openssl` CLI.
fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem"))
        .args(["-subj", &format!("/CN={name} test CA")]));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(p("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext"))
        .arg("-out")
        .arg(p("server.pem")));
    (p("ca.pem"), p("server.pem"), p("server.key"))
}

/// A client certificate and key signed by `name`'s CA (made by [`certificates`]); X.509 v3,
/// as rustls requires of a certificate it presents.
fn client_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    std::fs::write(p("client-ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=gw1"])
        .arg("-keyout")
        .arg(p("client.key"))
        .arg("-out")
        .arg(p("client.csr")));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("client.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("client-ext"))
        .arg("-out")
        .arg(p("client.pem")));
    (p("client.pem"), p("client.key"))
}

async fn last_error(gw: &sensorgate::Gateway, contains: &str) -> String {
    let stats = gw.uplink_stats().unwrap();
    tokio::time::timeout(LONG, async {
        loop {
            let e = stats.last_error.lock().unwrap().clone();
            if e.contains(contains) {
                return e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "last_error never mentioned {contains:?}: {:?}",
            stats.last_error.lock().unwrap()
        )
    })
}

/// Starts the gateway with `broken`, publishes 50 messages while the uplink fails and checks
/// they are stored and the failure says `why`.
async fn store_while_failing(broken: &str, why: &str) -> sensorgate::Gateway {
    let gw = start_gateway(broken).await;
    let (mut c, _) = Raw::connect(gw.local_addrs()[0], "producer", true).await;
    for i in 0..50u16 {
        c.publish_acked("sensors/a", format!("m{i}").as_bytes(), 1, i + 1)
            .await;
    }
    let e = last_error(&gw, why).await;
    println!("uplink error: {e}");
    assert_eq!(gw.outbox().unwrap().stats().depth, 50, "all kept");
    assert!(
        !gw.uplink_stats()
            .unwrap()
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    gw
}

async fn all_fifty_arrive(sink: &Sink) {
    let want: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    sink.wait("all stored messages", LONG, |s| {
        s.payloads("site/gw1/sensors/a") == want
    })
    .await;
}

/// Stores 50 messages with `broken`, restarts the gateway with `fixed`, and waits for all of
/// them upstream.
async fn store_then_deliver(sink: &Sink, broken: &str, fixed: &str, why: &str) {
    store_while_failing(broken, why).await.shutdown().await;
    let gw = start_gateway(fixed).await;
    all_fifty_arrive(sink).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_wrong_ca_is_reported_and_nothing_is_lost_once_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "good");
    let (wrong_ca, _, _) = certificates(dir.path(), "other");
    let up = Mosquitto::start(
        dir.path(),
        MosqOptions {
            tls: Some((ca.clone(), cert, key)),
            ..Default::default()
        },
    )
    .await;
    let ca_arg = ca.display().to_string();
    let sink = Sink::spawn_with(up.addr(), "counter", 1, &["site/#"], &["--cafile", &ca_arg]).await;
    let url = format!("mqtts://127.0.0.1:{}", up.port);
    let data = dir.path().join("data");
    let with_ca = |ca: &Path| {
        gateway_toml(
            &data,
            "127.0.0.1:0",
            &url,
            &format!("ca-file = {:?}", ca.display().to_string()),
            RULES,
            "",
        )
    };
    store_then_deliver(&sink, &with_ca(&wrong_ca), &with_ca(&ca), "TLS handshake").await;
}

/// mosquitto refusing anonymous clients: the gateway is `gw` / `right-secret`, the counting
/// subscriber `reader`.
async fn with_passwords(dir: &Path) -> (Mosquitto, Sink) {
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").unwrap();
    for (user, secret) in [("gw", "right-secret"), ("reader", "reader-secret")] {
        run(Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(&passwd)
            .args([user, secret]));
    }
    let up = Mosquitto::start(
        dir,
        MosqOptions {
            password_file: Some(passwd),
            ..Default::default()
        },
    )
    .await;
    let sink = Sink::spawn_with(
        up.addr(),
        "counter",
        1,
        &["site/#"],
        &["-u", "reader", "-P", "reader-secret"],
    )
    .await;
    (up, sink)
}

#[tokio::test]
async fn bad_credentials_are_reported_and_nothing_is_lost_once_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sink) = with_passwords(dir.path()).await;
    let url = format!("mqtt://{}", up.addr());
    let data = dir.path().join("data");
    let with_password = |secret: &str, file: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        gateway_toml(
            &data,
            "127.0.0.1:0",
            &url,
            &format!(
                "username = \"gw\"\npassword-file = {:?}",
                path.display().to_string()
            ),
            RULES,
            "",
        )
    };
    store_then_deliver(
        &sink,
        &with_password("wrong", "bad.pw"),
        &with_password("right-secret", "good.pw"),
        "refused",
    )
    .await;
}

/// A password file that is missing when the gateway starts does not stop it: the local broker
/// runs, messages are stored, and the file is read again on every attempt, so once it appears
/// everything is delivered without a restart.
#[tokio::test]
async fn a_missing_password_file_is_reported_and_read_once_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sink) = with_passwords(dir.path()).await;
    let later = dir.path().join("later.pw");
    let text = gateway_toml(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &format!("mqtt://{}", up.addr()),
        &format!(
            "username = \"gw\"\npassword-file = {:?}",
            later.display().to_string()
        ),
        RULES,
        "",
    );
    let gw = store_while_failing(&text, "cannot read the password file").await;
    std::fs::write(&later, "right-secret\n").unwrap();
    all_fifty_arrive(&sink).await;
    gw.shutdown().await;
}

/// Mutual TLS as AWS IoT Core requires: mosquitto demands a client certificate. The gateway
/// starts before its certificate is in place (stored, error reported), then delivers
/// everything once the certificate and key files appear.
#[tokio::test]
async fn mutual_tls_delivers_once_the_client_certificate_appears() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "mtls");
    let (client_cert, client_key) = client_certificate(dir.path(), "mtls");
    let up = Mosquitto::start(
        dir.path(),
        MosqOptions {
            tls: Some((ca.clone(), cert, key)),
            require_certificate: true,
            ..Default::default()
        },
    )
    .await;
    let arg = |p: &Path| p.display().to_string();
    let sink = Sink::spawn_with(
        up.addr(),
        "counter",
        1,
        &["site/#"],
        &[
            "--cafile",
            &arg(&ca),
            "--cert",
            &arg(&client_cert),
            "--key",
            &arg(&client_key),
        ],
    )
    .await;
    let (cert_at, key_at) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
    let text = gateway_toml(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &format!("mqtts://127.0.0.1:{}", up.port),
        &format!(
            "ca-file = {:?}\nclient-cert = {:?}\nclient-key = {:?}",
            arg(&ca),
            arg(&cert_at),
            arg(&key_at)
        ),
        RULES,
        "",
    );
    let gw = store_while_failing(&text, "client-cert").await;
    std::fs::copy(&client_key, &key_at).unwrap();
    std::fs::copy(&client_cert, &cert_at).unwrap();
    all_fifty_arrive(&sink).await;
    gw.shutdown().await;
}
