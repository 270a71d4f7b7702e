//! Command line (clap derive), turned into checked configurations before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use backends::blk::BlkConfig;
use clap::{Parser, Subcommand};
use mirror::{MirrorConfig, NetMode, ReadPolicy};
use transport::net::PathSpec;
use transport::{LegSpec, OpenOptions};

/// Mirrored vhost-user devices: every write goes down two independent paths, and losing one is
/// invisible to the guest.
#[derive(Debug, Parser)]
#[command(name = "vhost-mirror", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write fresh mirror metadata on the legs (once, before the first `blk`).
    Create(CreateArgs),
    /// Serve a mirrored virtio-blk disk on a vhost-user socket.
    Blk(BlkArgs),
    /// Serve a virtio-net NIC whose frames go down two network paths.
    Net(NetArgs),
    /// Terminate PRP for a host that does not speak it: two paths in, one ordinary interface out.
    PrpGateway(GatewayArgs),
    /// Run a fault drill described in a JSON file and report (see examples/scenarios/).
    Scenario(ScenarioArgs),
    /// Talk to a running daemon's control socket.
    Ctl(CtlArgs),
}

/// `vhost-mirror scenario`.
#[derive(Debug, Parser)]
pub struct ScenarioArgs {
    /// The scenario (JSON).
    pub file: PathBuf,

    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Scratch directory for the legs' images, sockets and the daemon log (kept afterwards).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `vhost-mirror net`.
#[derive(Debug, Parser)]
pub struct NetArgs {
    /// vhost-user socket to listen on (QEMU: -device vhost-user-net-pci,chardev=...).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// A path: tap:NAME or packet:IFNAME, with optional ?drop=PCT&reorder=PCT&delay=MS for drills.
    /// Give two.
    #[arg(long = "path", value_name = "SPEC", required = true)]
    pub paths: Vec<PathSpec>,

    /// prp (every frame on both paths, duplicates discarded) or active-backup.
    #[arg(long, value_name = "MODE", default_value = "prp")]
    pub mode: NetMode,

    /// The guest's MTU, to check the paths can carry its frames (plus 6 bytes in prp mode).
    #[arg(long, value_name = "BYTES", default_value_t = 1500,
          value_parser = clap::value_parser!(u32).range(68..=9000))]
    pub guest_mtu: u32,

    /// An IPv4 address beyond both paths that answers ARP (a gateway, the server): each path
    /// probes it (RFC 5227 ARP probes from a MAC of its own) and counts as down when it stops
    /// answering, so a cut past the first switch moves traffic too (active-backup).
    #[arg(long, value_name = "IPV4")]
    pub probe: Option<std::net::Ipv4Addr>,

    /// Milliseconds between probes; a path is down after 3 unanswered ones.
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub probe_interval: u64,

    /// Checksum and TSO offloads between the guest and the paths: auto turns them on in
    /// active-backup over two TAP paths (PRP cannot carry them), on insists, off never.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub offload: Offload,

    /// JSON control socket (status, fail-path, restore-path).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `--offload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Offload {
    Auto,
    On,
    Off,
}

impl NetArgs {
    /// Whether the paths carry virtio-net headers, or why `--offload on` cannot be had.
    pub fn offload(&self) -> Result<bool, String> {
        let taps = self
            .paths
            .iter()
            .all(|p| matches!(p.kind, transport::net::PathKind::Tap(_)));
        let possible = self.mode == NetMode::ActiveBackup && taps;
        match self.offload {
            Offload::Off => Ok(false),
            Offload::Auto => Ok(possible),
            Offload::On if possible => Ok(true),
            Offload::On if self.mode != NetMode::ActiveBackup => Err(
                "--offload on needs --mode active-backup: PRP's trailer goes after every \
                 frame's payload, which segmentation and checksum offload would not keep"
                    .into(),
            ),
            Offload::On => Err(
                "--offload on needs two tap: paths (the kernel's TAP carries \
                 the virtio-net header; a packet: path does not)"
                    .into(),
            ),
        }
    }
}

/// `vhost-mirror prp-gateway`.
#[derive(Debug, Parser)]
pub struct GatewayArgs {
    /// The two redundant paths (tap:NAME or packet:IFNAME).
    #[arg(long = "path", value_name = "SPEC", required = true)]
    pub paths: Vec<PathSpec>,

    /// The ordinary side: a TAP device (created, or attached) that sees plain frames.
    #[arg(long, value_name = "NAME")]
    pub tap: String,

    /// MTU of the hosts behind the gateway (checked against the paths, plus 6 bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 1500,
          value_parser = clap::value_parser!(u32).range(68..=9000))]
    pub mtu: u32,

    /// JSON control socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `vhost-mirror blk`.
#[derive(Debug, Parser)]
pub struct BlkArgs {
    /// vhost-user socket to listen on (QEMU: -chardev socket,path=...).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// A leg: file:PATH, nbd://HOST[:PORT][/EXPORT], nbd+unix:///EXPORT?socket=PATH or null:SIZE.
    /// Give it once per leg (two for a mirror).
    #[arg(long = "leg", value_name = "SPEC", required = true)]
    pub legs: Vec<LegSpec>,

    /// JSON control socket (status, fail-leg).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// A leg that does not answer a request within this many milliseconds is ejected.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub io_timeout: u64,

    /// The same for flush, discard and write-zeroes requests, which wait for the leg's
    /// write-back or cover large ranges (never below --io-timeout).
    #[arg(long, value_name = "MS", default_value_t = mirror::DEFAULT_FLUSH_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub flush_timeout: u64,

    /// Give up connecting to a remote leg after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub connect_timeout: u64,

    /// Number of virtqueues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Largest virtqueue the device accepts.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u16).range(1..=32768))]
    pub queue_size: u16,

    /// Longest a queue's worker polls for new requests before sleeping, in microseconds
    /// (adaptive: it polls less while polling finds nothing); 0 never polls.
    #[arg(long, value_name = "US", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,

    /// Leave legs' I/O to each leg's own threads: file-leg requests are not submitted and reaped
    /// in the queue worker's own io_uring, and NBD replies are not read by the queue worker
    /// (both the default, which saves thread hand-offs and wake-ups per request).
    #[arg(long)]
    pub leg_threads: bool,

    /// Present the disk read-only to the guest.
    #[arg(long)]
    pub readonly: bool,

    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID", default_value = "vhost-mirror", value_parser = parse_serial)]
    pub serial: String,

    /// Which leg serves reads: primary, round-robin or least-outstanding.
    #[arg(long, value_name = "POLICY", default_value = "least-outstanding")]
    pub read_policy: ReadPolicy,

    /// Accept legs of different sizes and present the smallest (with --no-metadata; with
    /// metadata the size is fixed by `create`).
    #[arg(long)]
    pub allow_size_mismatch: bool,

    /// Keep no metadata on the legs: no resync and no safe restart. For scratch disks, null legs
    /// and benchmarks.
    #[arg(long)]
    pub no_metadata: bool,

    /// Mirror the metadata in DIR/mirror-UUID.json as well.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Cap resync bandwidth (bytes per second, with K/M/G suffixes); 0 is unlimited.
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_rate)]
    pub resync_rate: u64,

    /// Resync bandwidth while the guest does I/O (bytes per second, K/M/G suffixes; 0: the
    /// resync does not slow down for the guest). On an idle disk the resync runs at full speed
    /// (or --resync-rate); once guest requests arrive it drops to this rate, and back up 200 ms
    /// after the last one.
    #[arg(long, value_name = "RATE", default_value = "64M", value_parser = parse_rate)]
    pub resync_busy_rate: u64,

    /// Take leg N as current whatever the metadata says (after a split brain: leg N's data wins,
    /// the others are resynced from it).
    #[arg(long, value_name = "N")]
    pub force_current: Option<usize>,

    /// Do not retry failed legs on their own (`ctl re-add N` still does).
    #[arg(long)]
    pub no_reconnect: bool,
}

/// `vhost-mirror create`.
#[derive(Debug, Parser)]
pub struct CreateArgs {
    /// A leg, as for `blk` (give each leg, in the order `blk` will get them).
    #[arg(long = "leg", value_name = "SPEC", required = true, num_args = 1)]
    pub legs: Vec<LegSpec>,

    /// Write-intent chunk: a power of two from 4K to 1G.
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_rate)]
    pub chunk_size: u64,

    /// The legs already hold the same data (e.g. both blank): no initial copy.
    #[arg(long)]
    pub assume_clean: bool,

    /// Give up connecting to a remote leg after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub connect_timeout: u64,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    transport::parse_size(s)
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        Err(format!(
            "'{s}' is {} bytes; a virtio-blk serial holds at most 20",
            s.len()
        ))
    } else {
        Ok(s.to_string())
    }
}

impl BlkArgs {
    /// The mirror's configuration.
    pub fn mirror_config(&self) -> MirrorConfig {
        MirrorConfig {
            io_timeout: Duration::from_millis(self.io_timeout),
            flush_timeout: Duration::from_millis(self.flush_timeout),
            read_policy: self.read_policy,
            allow_size_mismatch: self.allow_size_mismatch,
            open: OpenOptions {
                connect_timeout: Duration::from_millis(self.connect_timeout),
                read_only: self.readonly,
            },
            metadata: !self.no_metadata,
            force_current: self.force_current,
            resync_rate: self.resync_rate,
            resync_busy_rate: self.resync_busy_rate,
            reconnect: !self.no_reconnect,
            state_dir: self.state_dir.clone(),
        }
    }

    /// The device's configuration.
    pub fn blk_config(&self) -> BlkConfig {
        BlkConfig {
            num_queues: self.num_queues.into(),
            queue_size: self.queue_size.into(),
            read_only: self.readonly,
            serial: self.serial.clone(),
            poll_max: std::time::Duration::from_micros(self.poll_us),
            queue_rings: !self.leg_threads,
        }
    }
}

/// `vhost-mirror ctl`.
#[derive(Debug, Parser)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,

    /// Print the daemon's raw JSON answer.
    #[arg(long)]
    pub json: bool,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show every leg's state and counters (with a progress bar while a resync runs).
    Status {
        /// Follow a running resync until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Eject a leg (fault drills): its writes stop and reads move to the other legs.
    FailLeg {
        /// Leg index as listed by `status` (0 is the first --leg).
        leg: usize,
    },
    /// Try to bring a failed leg back now and resync it.
    ReAdd {
        /// Leg index.
        leg: usize,
    },
    /// Pause a running resync.
    ResyncPause,
    /// Resume a paused resync.
    ResyncResume,
    /// Cap resync bandwidth (bytes per second, K/M/G suffixes; 0 for none).
    SetResyncRate {
        #[arg(value_parser = parse_rate)]
        rate: u64,
    },
    /// Set the resync bandwidth while the guest does I/O (K/M/G suffixes; 0: the resync does
    /// not slow down for the guest).
    SetResyncBusyRate {
        #[arg(value_parser = parse_rate)]
        rate: u64,
    },
    /// Cut a network path as if its cable were pulled (fault drills).
    FailPath {
        /// Path index (0 is the first --path).
        path: usize,
    },
    /// Undo fail-path.
    RestorePath {
        /// Path index.
        path: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(args).map_err(|e| e.to_string())
    }

    fn net(extra: &[&str]) -> NetArgs {
        let mut v = vec!["vhost-mirror", "net", "--socket", "/tmp/s"];
        v.extend_from_slice(extra);
        match parse(&v).unwrap().command {
            Command::Net(a) => a,
            _ => panic!("not net"),
        }
    }

    #[test]
    fn offloads_follow_mode_and_paths() {
        let taps = ["--path", "tap:a", "--path", "tap:b"];
        let ab = [&taps[..], &["--mode", "active-backup"]].concat();
        assert_eq!(
            net(&ab).offload(),
            Ok(true),
            "auto: active-backup over TAPs"
        );
        assert_eq!(net(&taps).offload(), Ok(false), "auto: never with PRP");
        let mixed = [
            "--path",
            "tap:a",
            "--path",
            "packet:eth1",
            "--mode",
            "active-backup",
        ];
        assert_eq!(net(&mixed).offload(), Ok(false));
        let off = [&ab[..], &["--offload", "off"]].concat();
        assert_eq!(net(&off).offload(), Ok(false));
        let e = net(&[&taps[..], &["--offload", "on"]].concat())
            .offload()
            .unwrap_err();
        assert!(e.contains("active-backup"), "{e}");
        let e = net(&[&mixed[..], &["--offload", "on"]].concat())
            .offload()
            .unwrap_err();
        assert!(e.contains("tap:"), "{e}");
        let e = parse(&[
            "vhost-mirror",
            "net",
            "--socket",
            "/s",
            "--path",
            "tap:a",
            "--offload",
            "yes",
        ])
        .unwrap_err();
        assert!(e.contains("--offload"), "{e}");
    }

    #[test]
    fn blk_arguments_become_configs() {
        let cli = parse(&[
            "vhost-mirror",
            "blk",
            "--socket",
            "/tmp/s",
            "--leg",
            "null:1M",
            "--leg",
            "nbd://h:1/e",
            "--io-timeout",
            "250",
            "--num-queues",
            "2",
            "--serial",
            "abc",
        ])
        .unwrap();
        let Command::Blk(a) = cli.command else {
            panic!("not blk")
        };
        assert_eq!(a.legs.len(), 2);
        assert_eq!(a.mirror_config().io_timeout, Duration::from_millis(250));
        assert_eq!(
            a.mirror_config().flush_timeout,
            mirror::DEFAULT_FLUSH_TIMEOUT
        );
        assert_eq!(a.blk_config().num_queues, 2);
        assert_eq!(a.blk_config().serial, "abc");
    }

    #[test]
    fn create_and_ctl_arguments() {
        let cli = parse(&[
            "vhost-mirror",
            "create",
            "--leg",
            "null:1M",
            "--leg",
            "null:1M",
            "--chunk-size",
            "64K",
        ])
        .unwrap();
        let Command::Create(a) = cli.command else {
            panic!("not create")
        };
        assert_eq!(a.chunk_size, 64 << 10);
        assert!(!a.assume_clean);
        let cli = parse(&[
            "vhost-mirror",
            "ctl",
            "--control",
            "/c",
            "set-resync-rate",
            "10M",
        ])
        .unwrap();
        let Command::Ctl(c) = cli.command else {
            panic!("not ctl")
        };
        assert!(matches!(c.command, CtlCommand::SetResyncRate { rate } if rate == 10 << 20));
        let cli = parse(&[
            "vhost-mirror",
            "ctl",
            "--control",
            "/c",
            "set-resync-busy-rate",
            "0",
        ])
        .unwrap();
        let Command::Ctl(c) = cli.command else {
            panic!("not ctl")
        };
        assert!(matches!(
            c.command,
            CtlCommand::SetResyncBusyRate { rate: 0 }
        ));
        let e = parse(&[
            "vhost-mirror",
            "create",
            "--leg",
            "null:1M",
            "--chunk-size",
            "lots",
        ])
        .unwrap_err();
        assert!(e.contains("--chunk-size"), "{e}");
    }

    #[test]
    fn bad_arguments_name_the_problem() {
        let blk = ["vhost-mirror", "blk", "--socket", "/s"];
        let cases: [(&[&str], &str); 6] = [
            (&["--leg", "disk.img"], "invalid leg 'disk.img'"),
            (&[], "--leg"),
            (&["--leg", "null:1M", "--io-timeout", "0"], "--io-timeout"),
            (
                &["--leg", "null:1M", "--flush-timeout", "0"],
                "--flush-timeout",
            ),
            (
                &["--leg", "null:1M", "--serial", "123456789012345678901"],
                "at most 20",
            ),
            (
                &["--leg", "null:1M", "--read-policy", "best"],
                "unknown read policy 'best'",
            ),
        ];
        for (extra, want) in cases {
            let args: Vec<&str> = blk.iter().chain(extra).copied().collect();
            let e = parse(&args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
