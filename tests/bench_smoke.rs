//! Runs the broker benchmark's quick plan against sensorgate and mosquitto, so a change that
//! breaks the bench (or makes a broker fail under its load) shows up in `cargo test`.

#[allow(dead_code)]
#[path = "../benches/broker.rs"]
mod bench;

#[test]
fn the_quick_broker_bench_completes_every_case_against_both_brokers() {
    let report = bench::run(&bench::Plan::quick()).expect("the quick bench failed");
    let rows = report.lines().filter(|l| l.starts_with("| ")).count();
    // Header and rule, 5 flows × (rate, CPU), latency p50 and p99, idle time and RSS, peak RSS.
    assert_eq!(rows, 2 + 10 + 2 + 2 + 1, "unexpected table:\n{report}");
}
