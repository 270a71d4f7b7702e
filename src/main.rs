//! `vhost-mirror`: the daemon and its command-line tools.

mod cli;
mod control;
mod ctl;
mod netd;
mod scenario;

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use backends::blk::{self, BlkMirror, Completion};
use clap::Parser;
use mirror::{BlockMirror, IoStatus};
use serde_json::{json, Value};

use cli::{BlkArgs, Cli, Command, CreateArgs};
use control::{Controlled, Request};
use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::time::Duration;

struct BlkControl(BlkMirror);

impl Controlled for BlkControl {
    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => {
                return serde_json::to_value(self.0.status()).map_err(|e| e.to_string())
            }
            Request::FailLeg { leg } => self.0.fail_leg(leg),
            Request::ReAdd { leg } => self.0.re_add(leg),
            Request::ResyncPause => self.0.set_resync_paused(true),
            Request::ResyncResume => self.0.set_resync_paused(false),
            Request::SetResyncRate { rate } => self.0.set_resync_rate(rate),
            Request::SetResyncBusyRate { rate } => self.0.set_resync_busy_rate(rate),
            Request::FailPath { .. } | Request::RestorePath { .. } => {
                return Err("not a network daemon: paths belong to `vhost-mirror net`".into())
            }
        }
        .map(|()| json!({ "ok": true }))
        .map_err(|e| e.to_string())
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
    // SIGTERM/SIGINT: finish what is in flight and leave the legs clean, so the next start
    // needs no resync.
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("cannot catch signals: {e}"))?;
    let on_signal = mirror.clone();
    let socket = args.socket.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: shutting down");
                on_signal.shutdown(Duration::from_secs(30));
                let _ = std::fs::remove_file(&socket);
                std::process::exit(0);
            }
        })
        .map_err(|e| e.to_string())?;
    blk::serve(
        &args.socket,
        mirror,
        blk_cfg,
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(|e| e.to_string())
}

fn run_scenario(args: &cli::ScenarioArgs) -> Result<(), String> {
    let sc = scenario::Scenario::load(&args.file).map_err(|e| e.to_string())?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("vhost-mirror-scenario-{}", std::process::id()))
    });
    let report = scenario::run(&sc, &dir).map_err(|e| e.to_string())?;
    print!("{}", scenario::render(&report));
    println!(
        "(images, sockets and the daemon log are in {})",
        dir.display()
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if report.passed {
        Ok(())
    } else {
        Err(format!("scenario '{}' failed", report.name))
    }
}

fn run_create(args: &CreateArgs) -> Result<(), String> {
    let opts = transport::OpenOptions {
        connect_timeout: Duration::from_millis(args.connect_timeout),
        read_only: false,
    };
    let c = mirror::create(&args.legs, &opts, args.chunk_size, args.assume_clean)
        .map_err(|e| e.to_string())?;
    println!(
        "created mirror {} over {} legs: {} bytes of data, {} chunks of {} bytes",
        c.uuid,
        args.legs.len(),
        c.data_size,
        c.chunks,
        c.chunk_size
    );
    if !c.assume_clean {
        println!(
            "leg 0 is the source: the daemon copies it to the other legs in the background when it starts"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Create(args) => run_create(args),
        Command::Blk(args) => run_blk(args),
        Command::Net(args) => netd::run_net(args),
        Command::Scenario(args) => run_scenario(args),
        Command::PrpGateway(args) => netd::run_gateway(args),
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
