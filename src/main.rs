//! The `cfq-bridge` binary: everything lives in the library; see `cfq_bridge::cli`.

fn main() -> std::process::ExitCode {
    cfq_bridge::cli::main()
}
