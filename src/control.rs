//! The control socket: one JSON object per line in each direction.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"fail-leg","leg":N}`, `{"cmd":"re-add","leg":N}`,
//! `{"cmd":"resync-pause"}`, `{"cmd":"resync-resume"}`, `{"cmd":"set-resync-rate","rate":BYTES}`,
//! `{"cmd":"set-resync-busy-rate","rate":BYTES}`.
//! For network daemons: `{"cmd":"fail-path","path":N}`, `{"cmd":"restore-path","path":N}`.
//! Answers: the status object, or `{"ok":true}`, or `{"error":"..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;

use log::{info, warn};
use serde::Deserialize;
use serde_json::{json, Value};

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    FailLeg { leg: usize },
    ReAdd { leg: usize },
    ResyncPause,
    ResyncResume,
    SetResyncRate { rate: u64 },
    SetResyncBusyRate { rate: u64 },
    FailPath { path: usize },
    RestorePath { path: usize },
}

/// What answers control requests: the block daemon, later the net daemon.
pub trait Controlled: Send + Sync {
    fn handle(&self, req: Request) -> Result<Value, String>;
}

/// Longest request line accepted; a peer sending more is cut off rather than buffered forever.
const MAX_LINE: u64 = 64 * 1024;

/// Answers one line.
pub fn answer(target: &dyn Controlled, line: &str) -> Value {
    match serde_json::from_str::<Request>(line) {
        Ok(req) => match target.handle(req) {
            Ok(v) => v,
            Err(e) => json!({ "error": e }),
        },
        Err(e) => json!({ "error": format!("bad request: {e}") }),
    }
}

fn serve_client(stream: UnixStream, target: Arc<dyn Controlled>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match Read::by_ref(&mut reader)
            .take(MAX_LINE)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let _ = writeln!(out, "{}", json!({ "error": "request line too long" }));
            return;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let reply = answer(&*target, line);
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// Listens on `path` (replacing a stale socket) and answers every client on its own thread.
pub fn spawn(path: &Path, target: Arc<dyn Controlled>) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    info!("control socket on {}", path.display());
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let t = target.clone();
                        let _ = thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve_client(stream, t));
                    }
                    Err(e) => warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(())
}
