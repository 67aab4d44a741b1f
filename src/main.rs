//! The `cfq-bridge` binary: everything lives in the library; see `cfq_bridge::cli`.

/// jemalloc (feature `jemalloc`, on by default): freed memory goes back to the system in
/// the background, so RSS returns to its working set after bursts.
#[cfg(all(feature = "jemalloc", unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cfq_bridge::cli::main()
}
