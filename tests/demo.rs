//! The README's first command, `scripts/demo`, run as users run it: both clients, checked for
//! their verdict and for what they claim on the way.

mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;

/// The demo example, built next to this test by `cargo test --all-targets` (what scripts/test
/// runs).
fn demo_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let demo = profile_dir.join("examples/demo");
    assert!(
        demo.exists(),
        "{} is not built: run the tests with --all-targets (scripts/test does)",
        demo.display()
    );
    demo
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
