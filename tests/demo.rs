//! The README's first command, `scripts/demo`, run as users run it: both clients, checked for
//! their verdict and for what they claim on the way.

mod common;
use common::*;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The demo example, built the way scripts/demo builds it (`cargo test` builds examples only as
/// test harnesses, which cannot run the demo).
fn demo_exe() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "--example",
                    "demo",
                    "--message-format=json",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stderr(Stdio::inherit())
                .output()
                .unwrap();
            assert!(out.status.success(), "cargo build --example demo failed");
            // Cargo's own report says where the executable went (the target directory may be
            // anywhere: CARGO_TARGET_DIR, a workspace setting).
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|m| m["target"]["name"] == "demo")
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo reported no demo executable")
        })
        .clone()
}

fn run(client: &str) -> String {
    let _serial = exclusive();
    let out = Command::new(demo_exe())
        .args(["--client", client])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "demo --client {client} failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn demo_with_libblkio_passes() {
    let text = run("libblkio");
    assert!(text.contains("killed leg 1's nbdkit server"), "{text}");
    assert!(
        text.contains("leg 1 failed"),
        "the kill was not seen:\n{text}"
    );
    assert!(text.contains("0 wrong"), "{text}");
    assert!(text.contains("guest errors 0"), "{text}");
    assert!(!text.contains("guest errors 1"), "{text}");
    assert!(text.contains("\nPASS"), "{text}");
}

#[test]
fn demo_with_a_guest_passes() {
    if std::env::var("VHM_SKIP_GUEST").as_deref() == Ok("1") {
        eprintln!("!!! VHM_SKIP_GUEST=1: the demo's QEMU guest run is SKIPPED !!!");
        return;
    }
    let text = run("guest");
    assert!(text.contains("guest booted; fio starts"), "{text}");
    assert!(
        text.contains("leg 1 failed"),
        "the kill was not seen:\n{text}"
    );
    assert!(
        text.contains("fio exit 0, guest kernel I/O errors: 0"),
        "{text}"
    );
    assert!(text.contains(": 0 blocks differ"), "{text}");
    assert!(text.contains("\nPASS"), "{text}");
}
