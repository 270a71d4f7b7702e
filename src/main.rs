//! `vhost-mirror`: the daemon and its command-line tools.

mod cli;
mod control;
mod ctl;

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use backends::blk::{self, BlkMirror, Completion};
use clap::Parser;
use mirror::{BlockMirror, IoStatus};
use serde_json::{json, Value};

use cli::{BlkArgs, Cli, Command};
use control::{Controlled, Request};

struct BlkControl(BlkMirror);

impl Controlled for BlkControl {
    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => serde_json::to_value(self.0.status()).map_err(|e| e.to_string()),
            Request::FailLeg { leg } => {
                self.0.fail_leg(leg).map_err(|e| e.to_string())?;
                Ok(json!({ "ok": true }))
            }
        }
    }
}

fn run_blk(args: &BlkArgs) -> Result<(), String> {
    let blk_cfg = args.blk_config();
    blk_cfg.validate().map_err(|e| e.to_string())?;
    let mirror: BlkMirror = BlockMirror::open(
        &args.legs,
        args.mirror_config(),
        |c: Completion, status: IoStatus| c.finish(status),
    )
    .map_err(|e| e.to_string())?;
    if let Some(path) = &args.control {
        control::spawn(path, Arc::new(BlkControl(mirror.clone())))
            .map_err(|e| format!("cannot open control socket {}: {e}", path.display()))?;
    }
    blk::serve(
        &args.socket,
        mirror,
        blk_cfg,
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Blk(args) => run_blk(args),
        Command::Ctl(args) => ctl::run(args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-mirror: {e}");
            ExitCode::FAILURE
        }
    }
}
