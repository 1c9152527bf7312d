//! Puts `memory.x` where the linker finds it and passes the cortex-m-rt, RP2040 boot2 and (with the
//! `defmt` feature) defmt linker scripts.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x to OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SENSORGATE_NODE_ID");
    println!("cargo:rerun-if-env-changed=SENSORGATE_INTERVAL_MS");

    println!("cargo:rustc-link-arg-bins=--nmagic");
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    println!("cargo:rustc-link-arg-bins=-Tlink-rp.x");
    // lora-phy (feature `radio`) always links defmt, whose sections need its linker script;
    // they take no flash (they are debug info), and with no log enabled no logger is needed.
    if env::var_os("CARGO_FEATURE_DEFMT").is_some() || env::var_os("CARGO_FEATURE_RADIO").is_some()
    {
        println!("cargo:rustc-link-arg-bins=-Tdefmt.x");
    }
}
