//! Leg URIs: `file:PATH`, `nbd://HOST[:PORT][/EXPORT]`, `nbd+unix:///EXPORT?socket=PATH`,
//! `null:SIZE`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP host and port (default port 10809).
    Tcp { host: String, port: u16 },
    /// Unix domain socket path.
    Unix(PathBuf),
}

/// A parsed leg URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegSpec {
    /// A local file or block device, driven by io_uring. `direct` selects O_DIRECT.
    File { path: PathBuf, direct: bool },
    /// An NBD export.
    Nbd { address: NbdAddress, export: String },
    /// A device that completes every request at once and reads zeroes: for measuring the pipeline.
    Null { size: u64 },
}

/// A leg URI that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid leg '{uri}': {reason} (expected file:PATH, nbd://HOST[:PORT][/EXPORT], nbd+unix:///EXPORT?socket=PATH or null:SIZE)")]
pub struct SpecError {
    pub uri: String,
    pub reason: String,
}

/// Default NBD TCP port (IANA).
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Parses sizes such as `4096`, `64M`, `1G`, `2GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4096, 64M, 1G)"))?;
    let mult: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size suffix '{other}' in '{s}'")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' overflows"))
}

fn split_query(s: &str) -> (&str, Vec<(&str, &str)>) {
    match s.split_once('?') {
        None => (s, Vec::new()),
        Some((head, q)) => (
            head,
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect(),
        ),
    }
}

impl FromStr for LegSpec {
    type Err = SpecError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| SpecError {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = uri.strip_prefix("file:") {
            let (path, query) = split_query(rest);
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(err("empty path"));
            }
            let mut direct = true;
            for (k, v) in query {
                match (k, v) {
                    ("direct", "on" | "true" | "1") => direct = true,
                    ("direct", "off" | "false" | "0") => direct = false,
                    _ => {
                        return Err(err(&format!(
                            "unknown option '{k}={v}' (known: direct=on|off)"
                        )))
                    }
                }
            }
            return Ok(LegSpec::File {
                path: PathBuf::from(path),
                direct,
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = split_query(rest);
            let export = path.strip_prefix('/').unwrap_or(path).to_string();
            let mut socket = None;
            for (k, v) in query {
                match k {
                    "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
                    _ => return Err(err(&format!("unknown option '{k}' (known: socket=PATH)"))),
                }
            }
            let socket = socket.ok_or_else(|| err("missing ?socket=PATH"))?;
            return Ok(LegSpec::Nbd {
                address: NbdAddress::Unix(socket),
                export,
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, export) = match rest.split_once('/') {
                Some((a, e)) => (a, e.to_string()),
                None => (rest, String::new()),
            };
            if authority.is_empty() {
                return Err(err("missing host"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, tail) = v6
                    .split_once(']')
                    .ok_or_else(|| err("unterminated '[' in host"))?;
                let port = match tail.strip_prefix(':') {
                    Some(p) => p.parse().map_err(|_| err(&format!("bad port '{p}'")))?,
                    None if tail.is_empty() => NBD_DEFAULT_PORT,
                    None => return Err(err("junk after ']'")),
                };
                (h.to_string(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_string(),
                        p.parse().map_err(|_| err(&format!("bad port '{p}'")))?,
                    ),
                    None => (authority.to_string(), NBD_DEFAULT_PORT),
                }
            };
            if port == 0 {
                return Err(err("port 0"));
            }
            return Ok(LegSpec::Nbd {
                address: NbdAddress::Tcp { host, port },
                export,
            });
        }
        if let Some(rest) = uri.strip_prefix("null:") {
            let size = parse_size(rest).map_err(|e| err(&e))?;
            if size == 0 || size % 512 != 0 {
                return Err(err("size must be a non-zero multiple of 512"));
            }
            return Ok(LegSpec::Null { size });
        }
        Err(err("unknown scheme"))
    }
}

impl fmt::Display for LegSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LegSpec::File { path, direct: true } => write!(f, "file:{}", path.display()),
            LegSpec::File {
                path,
                direct: false,
            } => write!(f, "file:{}?direct=off", path.display()),
            LegSpec::Nbd {
                address: NbdAddress::Tcp { host, port },
                export,
            } => {
                if host.contains(':') {
                    write!(f, "nbd://[{host}]:{port}/{export}")
                } else {
                    write!(f, "nbd://{host}:{port}/{export}")
                }
            }
            LegSpec::Nbd {
                address: NbdAddress::Unix(p),
                export,
            } => write!(f, "nbd+unix:///{export}?socket={}", p.display()),
            LegSpec::Null { size } => write!(f, "null:{size}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_schemes() {
        assert_eq!(
            "file:/tmp/a.img".parse::<LegSpec>().unwrap(),
            LegSpec::File {
                path: "/tmp/a.img".into(),
                direct: true
            }
        );
        assert_eq!(
            "file:/tmp/a.img?direct=off".parse::<LegSpec>().unwrap(),
            LegSpec::File {
                path: "/tmp/a.img".into(),
                direct: false
            }
        );
        assert_eq!(
            "nbd://127.0.0.1:10810/disk".parse::<LegSpec>().unwrap(),
            LegSpec::Nbd {
                address: NbdAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10810
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            "nbd://server".parse::<LegSpec>().unwrap(),
            LegSpec::Nbd {
                address: NbdAddress::Tcp {
                    host: "server".into(),
                    port: 10809
                },
                export: String::new()
            }
        );
        assert_eq!(
            "nbd://[::1]:99/x".parse::<LegSpec>().unwrap(),
            LegSpec::Nbd {
                address: NbdAddress::Tcp {
                    host: "::1".into(),
                    port: 99
                },
                export: "x".into()
            }
        );
        assert_eq!(
            "nbd+unix:///e?socket=/run/a.sock"
                .parse::<LegSpec>()
                .unwrap(),
            LegSpec::Nbd {
                address: NbdAddress::Unix("/run/a.sock".into()),
                export: "e".into()
            }
        );
        assert_eq!(
            "null:1G".parse::<LegSpec>().unwrap(),
            LegSpec::Null { size: 1 << 30 }
        );
    }

    #[test]
    fn rejects_bad_uris_with_reason() {
        for bad in [
            "",
            "disk.img",
            "file:",
            "nbd://",
            "nbd://h:port",
            "nbd://h:0",
            "nbd+unix:///e",
            "null:0",
            "null:100",
            "null:1X",
            "file:/a?o_direct=1",
        ] {
            let e = bad.parse::<LegSpec>().unwrap_err();
            assert_eq!(e.uri, bad);
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "file:/tmp/a.img",
            "file:/tmp/a.img?direct=off",
            "nbd://h:1/e",
            "nbd+unix:///e?socket=/s",
            "null:4096",
        ] {
            let spec: LegSpec = s.parse().unwrap();
            assert_eq!(spec.to_string().parse::<LegSpec>().unwrap(), spec);
        }
    }
}
