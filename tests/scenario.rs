//! `vhost-mirror scenario`: the storage engineer's drill runner, run on the shipped scenarios.

mod common;
use common::*;

use std::process::Command;

fn run(name: &str) -> serde_json::Value {
    let dir = TempDir::new(&format!("scenario-{name}"));
    let file = format!(
        "{}/examples/scenarios/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let report = dir.path("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"))
        .arg("scenario")
        .arg(&file)
        .arg("--json")
        .arg(&report)
        .arg("--dir")
        .arg(dir.path("work"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{name} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("PASS"), "{text}");
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

#[test]
fn killed_server_drill_reports_detection_and_resync() {
    let _serial = exclusive();
    let r = run("kill-and-return");
    assert_eq!(r["passed"], true);
    assert_eq!(r["guest_io_errors"], 0);
    assert_eq!(r["blocks_wrong"], 0);
    assert!(r["blocks_verified"].as_u64().unwrap() > 1000, "{r}");
    assert!(r["longest_stall_ms"].as_f64().unwrap() < 1000.0, "{r}");
    let kill = &r["events"][0];
    assert_eq!(kill["action"], "kill");
    let detected = kill["detected_after"].as_f64().expect("kill not detected");
    assert!(detected < 1.0, "detection took {detected} s");
    assert!(r["resync_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["resync_seconds"].as_f64().is_some(), "{r}");
    assert_eq!(r["final_status"]["legs"][1]["state"], "uptodate");
}

#[test]
fn hung_server_drill_is_detected_after_the_timeout() {
    let _serial = exclusive();
    let r = run("hung-server");
    let detected = r["events"][0]["detected_after"]
        .as_f64()
        .expect("hang not detected");
    // --io-timeout 500 in the scenario, watchdog tick 125 ms, status polled every 10 ms.
    assert!(
        (0.4..2.0).contains(&detected),
        "detection after {detected} s"
    );
    assert!(r["longest_stall_ms"].as_f64().unwrap() >= 400.0, "{r}");
    assert_eq!(r["guest_io_errors"], 0);
}

#[test]
fn a_broken_scenario_file_is_a_clear_error() {
    let dir = TempDir::new("scenario-bad");
    let f = dir.path("bad.json");
    std::fs::write(
        &f,
        r#"{"name":"x","legs":[{},{}],"events":[{"at":1,"action":"melt","leg":0}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"))
        .arg("scenario")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("unknown action 'melt'"), "{e}");
}
