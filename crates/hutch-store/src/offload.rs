//! Running blocking work from code that may sit on an async worker ([`offload`]).

/// Runs blocking `f` without stalling an async worker: through `block_in_place` on a
/// multi-threaded tokio runtime, directly anywhere else (plain threads, blocking-pool threads,
/// a current-thread runtime, where `block_in_place` is not allowed).
pub(crate) fn offload<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
