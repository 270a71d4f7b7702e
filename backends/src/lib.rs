//! vhost-user devices on the rust-vmm crates, turning virtqueue requests into mirror operations and
//! completions back into used-ring entries.

pub mod blk;
pub mod net;
