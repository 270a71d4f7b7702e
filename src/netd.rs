//! The network daemons: `net` (a vhost-user-net NIC over two paths) and `prp-gateway` (PRP
//! terminated for a host that does not speak it).

use std::os::fd::RawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use backends::net::{self as netdev, NetStats};
use log::{info, warn};
use mirror::{NetConfig, NetMirror, NetMode, POLL_BUDGET};
use serde_json::{json, Value};
use transport::net::{NetPath, PathSpec, MAX_FRAME, VNET_HDR_LEN};

use crate::cli::{GatewayArgs, NetArgs};
use crate::control::{self, Controlled, Request};

struct NetControl {
    engine: NetMirror,
    device: Option<Arc<NetStats>>,
}

impl Controlled for NetControl {
    fn handle(&self, req: Request) -> Result<Value, String> {
        let r = match req {
            Request::Status => {
                let mut v =
                    serde_json::to_value(self.engine.status()).map_err(|e| e.to_string())?;
                if let (Some(d), Some(obj)) = (&self.device, v.as_object_mut()) {
                    obj.insert(
                        "device".into(),
                        serde_json::to_value(d.status()).map_err(|e| e.to_string())?,
                    );
                }
                return Ok(v);
            }
            Request::FailPath { path } => self.engine.fail_path(path),
            Request::RestorePath { path } => self.engine.restore_path(path),
            _ => return Err("not a block daemon: status, fail-path and restore-path only".into()),
        };
        r.map(|()| json!({ "ok": true })).map_err(|e| e.to_string())
    }
}

fn open_engine(paths: &[PathSpec], cfg: NetConfig) -> Result<NetMirror, String> {
    if paths.len() != 2 {
        return Err(format!(
            "give exactly two --path options, got {}",
            paths.len()
        ));
    }
    NetMirror::open(paths, cfg).map_err(|e| e.to_string())
}

/// `vhost-mirror net`.
pub fn run_net(args: &NetArgs) -> Result<(), String> {
    let engine = open_engine(
        &args.paths,
        NetConfig {
            mode: args.mode,
            guest_mtu: args.guest_mtu,
            probe: args.probe,
            probe_interval: Duration::from_millis(args.probe_interval),
            offload: args.offload()?,
            ..Default::default()
        },
    )?;
    let stats = Arc::new(NetStats::default());
    if let Some(path) = &args.control {
        control::spawn(
            path,
            Arc::new(NetControl {
                engine: engine.clone(),
                device: Some(stats.clone()),
            }),
        )
        .map_err(|e| format!("cannot open control socket {}: {e}", path.display()))?;
    }
    netdev::serve(
        &args.socket,
        engine,
        stats,
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(|e| e.to_string())
}

fn wait_readable(fds: &[RawFd]) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1000) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLERR) != 0)
        .collect()
}

/// `vhost-mirror prp-gateway`: frames from the TAP go out on both paths with PRP trailers;
/// frames from either path are de-duplicated, stripped and handed to the TAP.
pub fn run_gateway(args: &GatewayArgs) -> Result<(), String> {
    let engine = open_engine(
        &args.paths,
        NetConfig {
            mode: NetMode::Prp,
            guest_mtu: args.mtu,
            ..Default::default()
        },
    )?;
    let tap = NetPath::open(
        &format!("tap:{}", args.tap)
            .parse::<PathSpec>()
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    if let Some(path) = &args.control {
        control::spawn(
            path,
            Arc::new(NetControl {
                engine: engine.clone(),
                device: None,
            }),
        )
        .map_err(|e| format!("cannot open control socket {}: {e}", path.display()))?;
    }
    info!(
        "prp-gateway: {} and {} <-> tap {}",
        args.paths[0], args.paths[1], args.tap
    );
    let mut fds = engine.fds();
    fds.push(tap.fd());
    // The mirror takes and gives virtio-net packets; the gateway's TAP has no header, so
    // frames read from it go behind a zero one.
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
    loop {
        let ready = wait_readable(&fds);
        for (i, r) in ready.iter().enumerate().take(2) {
            if *r {
                engine.poll(i, &mut |packet| {
                    if let Err(e) = tap.send(&packet[VNET_HDR_LEN..]) {
                        warn!("tap {}: {e}", args.tap);
                    }
                });
            }
        }
        if ready[2] {
            // In turns with the paths, as they are read (`poll` is level-triggered).
            for _ in 0..POLL_BUDGET {
                match tap.recv(&mut buf[VNET_HDR_LEN..]) {
                    Ok(n) => engine.transmit(&buf[..VNET_HDR_LEN + n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("tap {}: {e}", args.tap)),
                }
            }
        }
    }
}
