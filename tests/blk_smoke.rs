//! The daemon over null legs, driven by libblkio: the pipeline without any remote peer.

mod common;
use common::*;

#[test]
fn null_legs_serve_a_libblkio_client() {
    let dir = TempDir::new("smoke");
    let d = Daemon::start(
        &dir,
        &["null:64M".into(), "null:64M".into()],
        &["--no-metadata"],
    );
    let mut c = Client::connect(&d.socket, 4);
    assert_eq!(c.capacity, 64 << 20);
    assert_eq!(c.write(0, &[0xAB; 4096]), 0);
    assert_eq!(
        c.read(4096, 4096).unwrap(),
        vec![0u8; 4096],
        "null legs read zeroes"
    );
    assert_eq!(c.flush(), 0);
    // Past the end: refused, not crashed.
    assert_ne!(c.write(64 << 20, &[1; 512]), 0);
    let st = d.status();
    assert_eq!(st["legs"][0]["state"], "uptodate");
    assert!(st["legs"][0]["ops"].as_u64().unwrap() >= 2);
}
