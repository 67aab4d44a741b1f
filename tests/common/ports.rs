//! The one place a test names a port for a process instead of letting it choose.
//!
//! The benches include this file by path (`benches/support/mod.rs`).

/// A loopback port that was free a moment ago: bound to `127.0.0.1:0`, then released.
///
/// Racy by nature (another process may take the port before the child binds it), so it is
/// used only where the child cannot choose its own port and tell us:
/// - the bridge's `[metrics] listen`: the bridge logs the configured address, not the one
///   it bound, so `127.0.0.1:0` could not be found again;
/// - tansu (`kafka_broker::BrokerBehindProxy`, `benches/kafka.rs`): it does not report a
///   port it chose, so the test names one (and retries on a bind conflict).
///
/// Everything else binds `127.0.0.1:0` and keeps the listener, or lets the process choose.
pub fn reserve_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
