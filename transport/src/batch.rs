//! Completion batches.
//!
//! A thread that finishes many requests in a row (a leg's completion loop reaping a ring, a
//! device's pass over its queue) marks the stretch with [`run`]. Whoever is told of a completion
//! inside it may leave its per-completion work that is cheaper done once (publishing answers in a
//! ring, notifying a guest) to the end of the batch with [`at_end`]: one lock and one wake-up per
//! batch instead of one per request. Outside a batch, [`at_end`] runs the work at once.
//!
//! Everything is per thread, so a batch never delays another thread's completions, and a batch
//! ends before its thread goes back to sleep; a thread that must wait inside one first runs what
//! it holds with [`run_pending`].
//!
//! Submissions use the same mark: an NBD leg sends the commands submitted inside a batch together
//! when it ends (one `sendmsg` per leg for a whole pass over a queue). So nothing inside a batch
//! may wait for the outcome of a request it submitted: that request has not left yet.

use std::cell::{Cell, RefCell};

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static HOOKS: RefCell<Vec<fn()>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` as (part of) a completion batch; the work left with [`at_end`] meanwhile runs when
/// the outermost batch of this thread ends, also if `f` panics.
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            let depth = DEPTH.with(|d| {
                let v = d.get() - 1;
                d.set(v);
                v
            });
            if depth == 0 {
                flush();
            }
        }
    }
    DEPTH.with(|d| d.set(d.get() + 1));
    let _end = End;
    f()
}

/// Whether this thread is inside a batch.
pub fn active() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

/// Runs the work left with [`at_end`] so far without ending the batch. For a thread about to
/// wait inside a batch (a reader waiting for the rest of a payload): what it finished before
/// must not wait with it. Outside a batch there is nothing to run.
pub fn run_pending() {
    if active() {
        flush();
    }
}

/// Runs `hook` when this thread's batch ends (once, however often it is registered during the
/// batch), or at once outside a batch. The hook finds its work in its own thread-local state.
pub fn at_end(hook: fn()) {
    if !active() {
        hook();
        return;
    }
    HOOKS.with(|h| {
        let mut h = h.borrow_mut();
        if !h.iter().any(|&x| x as usize == hook as usize) {
            h.push(hook);
        }
    });
}

fn flush() {
    loop {
        // Hooks run outside the batch: what they complete in turn is done at once.
        let next = HOOKS.with(|h| h.borrow_mut().pop());
        match next {
            Some(hook) => hook(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static RAN: Cell<u32> = const { Cell::new(0) };
    }

    fn count() {
        RAN.with(|r| r.set(r.get() + 1));
    }

    #[test]
    fn outside_a_batch_hooks_run_at_once() {
        RAN.with(|r| r.set(0));
        at_end(count);
        assert_eq!(RAN.with(Cell::get), 1);
    }

    #[test]
    fn inside_a_batch_hooks_run_once_at_the_outermost_end() {
        RAN.with(|r| r.set(0));
        run(|| {
            at_end(count);
            run(|| at_end(count));
            assert!(active());
            assert_eq!(RAN.with(Cell::get), 0);
        });
        assert!(!active());
        assert_eq!(RAN.with(Cell::get), 1);
    }

    #[test]
    fn run_pending_runs_the_hooks_so_far_and_the_batch_goes_on() {
        RAN.with(|r| r.set(0));
        run(|| {
            at_end(count);
            run_pending();
            assert_eq!(RAN.with(Cell::get), 1);
            assert!(active());
            at_end(count);
        });
        assert_eq!(RAN.with(Cell::get), 2);
        run_pending();
        assert_eq!(RAN.with(Cell::get), 2);
    }

    #[test]
    fn hooks_run_when_the_batch_panics() {
        RAN.with(|r| r.set(0));
        let r = std::panic::catch_unwind(|| {
            run(|| {
                at_end(count);
                panic!("boom");
            })
        });
        assert!(r.is_err());
        assert!(!active());
        assert_eq!(RAN.with(Cell::get), 1);
    }
}
