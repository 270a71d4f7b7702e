//! `vhost-mirror ctl`: the control socket's client for people and scripts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::cli::{CtlArgs, CtlCommand};

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach the control socket {path}: {source} (is the daemon running with --control?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon answered with something that is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("daemon refused: {0}")]
    Refused(String),
}

/// Sends one request and returns the answer.
pub fn request(path: &std::path::Path, req: &Value) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line)?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(CtlError::Refused(e.to_string()));
    }
    Ok(v)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Renders a status answer for people.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    let cap = v.get("capacity").and_then(Value::as_u64).unwrap_or(0);
    let inflight = v.get("inflight").and_then(Value::as_u64).unwrap_or(0);
    out.push_str(&format!(
        "disk: {} ({cap} bytes), {inflight} requests in flight\n",
        human_bytes(cap)
    ));
    for leg in v
        .get("legs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| {
            leg.get(k)
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_string()
        };
        let n = |k: &str| leg.get(k).and_then(Value::as_u64).unwrap_or(0);
        out.push_str(&format!(
            "leg {} {:<9} {} (generation {})\n    in flight {}, ops {}, errors {}, read {}, written {}\n",
            n("index"),
            s("state"),
            s("uri"),
            n("generation"),
            n("inflight"),
            n("ops"),
            n("errors"),
            human_bytes(n("bytes_read")),
            human_bytes(n("bytes_written")),
        ));
        if let Some(e) = leg.get("last_error").and_then(Value::as_str) {
            out.push_str(&format!("    last error: {e}\n"));
        }
    }
    out
}

/// Renders a network daemon's status for people.
pub fn render_net_status(v: &Value) -> String {
    let mut out = format!(
        "mode {}, {} failovers\n",
        v.get("mode").and_then(Value::as_str).unwrap_or("-"),
        v.get("failovers").and_then(Value::as_u64).unwrap_or(0)
    );
    for p in v
        .get("paths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        out.push_str(&format!(
            "path {} {:<6} {}{}\n    sent {}, received {}, delivered {}, send errors {}, oversize {}\n",
            n("index"),
            s("state"),
            s("spec"),
            if p.get("active").and_then(Value::as_bool) == Some(true) { " (active)" } else { "" },
            n("sent"),
            n("received"),
            n("delivered"),
            n("send_errors"),
            n("oversize"),
        ));
    }
    if let Some(prp) = v.get("prp").filter(|p| !p.is_null()) {
        out.push_str(&format!("prp: {prp}\n"));
    }
    if let Some(d) = v.get("device").filter(|p| !p.is_null()) {
        out.push_str(&format!("device: {d}\n"));
    }
    out
}

/// One line for a resync in progress (the live bar needs a terminal; this does not).
pub fn render_resync(r: &Value) -> String {
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (done, total) = (n("done_bytes"), n("total_bytes").max(1));
    let width = 30;
    let filled = (done * width / total).min(width) as usize;
    let zeros = match n("zeroed_bytes") {
        0 => String::new(),
        z => format!(", {} of it zeros", human_bytes(z)),
    };
    format!(
        "resync leg {} [{}{}] {} of {} ({}%), {}/s{zeros}{}",
        n("leg"),
        "=".repeat(filled),
        " ".repeat(width as usize - filled),
        human_bytes(done),
        human_bytes(n("total_bytes")),
        done * 100 / total,
        human_bytes(n("rate")),
        resync_note(r)
    )
}

/// Why a resync is not running at full speed, for the status line and the progress bar.
fn resync_note(r: &Value) -> &'static str {
    let flag = |k: &str| r.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("paused") {
        " (paused)"
    } else if flag("yielding") {
        " (yielding to guest I/O)"
    } else {
        ""
    }
}

fn resync_bar(r: &Value) -> ProgressBar {
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    let bar = ProgressBar::new(n("total_bytes"));
    bar.set_style(
        ProgressStyle::with_template(
            "resync leg {msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    update_bar(&bar, r);
    bar
}

fn update_bar(bar: &ProgressBar, r: &Value) {
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    bar.set_length(n("total_bytes"));
    bar.set_position(n("done_bytes"));
    bar.set_message(format!("{}{}", n("leg"), resync_note(r)));
}

fn status(args: &CtlArgs, watch: bool) -> Result<(), CtlError> {
    let req = json!({ "cmd": "status" });
    let v = request(&args.control, &req)?;
    if args.json {
        println!("{v}");
        return Ok(());
    }
    if v.get("paths").is_some() {
        print!("{}", render_net_status(&v));
        return Ok(());
    }
    print!("{}", render_status(&v));
    let Some(r) = v.get("resync").filter(|r| !r.is_null()) else {
        return Ok(());
    };
    println!("{}", render_resync(r));
    if !watch {
        return Ok(());
    }
    let bar = resync_bar(r);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let v = request(&args.control, &req)?;
        match v.get("resync").filter(|r| !r.is_null()) {
            Some(r) => update_bar(&bar, r),
            None => {
                bar.finish();
                print!("{}", render_status(&v));
                return Ok(());
            }
        }
    }
}

/// Runs `vhost-mirror ctl`.
pub fn run(args: &CtlArgs) -> Result<(), CtlError> {
    let req = match &args.command {
        CtlCommand::Status { watch } => return status(args, *watch),
        CtlCommand::FailLeg { leg } => json!({ "cmd": "fail-leg", "leg": leg }),
        CtlCommand::ReAdd { leg } => json!({ "cmd": "re-add", "leg": leg }),
        CtlCommand::ResyncPause => json!({ "cmd": "resync-pause" }),
        CtlCommand::ResyncResume => json!({ "cmd": "resync-resume" }),
        CtlCommand::SetResyncRate { rate } => json!({ "cmd": "set-resync-rate", "rate": rate }),
        CtlCommand::SetResyncBusyRate { rate } => {
            json!({ "cmd": "set-resync-busy-rate", "rate": rate })
        }
        CtlCommand::FailPath { path } => json!({ "cmd": "fail-path", "path": path }),
        CtlCommand::RestorePath { path } => json!({ "cmd": "restore-path", "path": path }),
    };
    let v = request(&args.control, &req)?;
    if args.json {
        println!("{v}");
    } else {
        println!("ok");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_line_says_why_it_is_slow() {
        let r = json!({"leg": 1, "done_bytes": 1 << 20, "total_bytes": 4 << 20, "rate": 1 << 20,
                       "paused": false, "yielding": true});
        let line = render_resync(&r);
        assert!(line.contains("resync leg 1"), "{line}");
        assert!(line.contains("(25%)"), "{line}");
        assert!(line.ends_with(" (yielding to guest I/O)"), "{line}");
        assert!(!line.contains("zeros"), "{line}");
        let z = json!({"leg": 1, "done_bytes": 2 << 20, "zeroed_bytes": 1 << 20,
                       "total_bytes": 4 << 20, "rate": 1 << 20});
        let line = render_resync(&z);
        assert!(line.contains("/s, 1.0 MiB of it zeros"), "{line}");
        let paused = json!({"leg": 0, "done_bytes": 0, "total_bytes": 1, "paused": true,
                            "yielding": true});
        assert!(render_resync(&paused).ends_with(" (paused)"));
        let full = json!({"leg": 0, "done_bytes": 0, "total_bytes": 1, "paused": false,
                          "yielding": false});
        assert!(
            render_resync(&full).ends_with("/s"),
            "{}",
            render_resync(&full)
        );
    }
}
