//! Local file or block device leg (io_uring). Being written.

use std::sync::Arc;
use crate::block::*;
use crate::OpenOptions;
use crate::OpenError;
/// Placeholder.
pub struct NbdLeg;
impl NbdLeg {
    /// Placeholder.
    pub fn connect(uri: String, _p: &crate::NbdAddress, _d: &str, _o: &OpenOptions, _s: Arc<dyn CompletionSink>) -> Result<Self, OpenError> { Err(OpenError::Unusable { uri, reason: "not yet".into() }) }
}
impl BlockLeg for NbdLeg { fn uri(&self) -> &str { "" } fn info(&self) -> &LegInfo { unreachable!() } fn submit(&self, _r: LegRequest) {} fn abort(&self, _r: &str) {} fn is_alive(&self) -> bool { false } }
