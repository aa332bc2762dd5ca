//! The `quotawatch` binary: parse the command line, run it, report failure.

use clap::Parser;

/// Requests allocate and free many small objects on every worker thread;
/// mimalloc's per-thread free lists cost a fraction of the system
/// allocator's arenas (see bench/proxy.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    quotawatch::telemetry::install_crypto_provider();
    let cli = quotawatch::cli::Cli::parse();
    match quotawatch::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Errors of the database or Redis client may echo the URL given.
            let message = quotawatch::telemetry::mask_secrets(&error.to_string()).into_owned();
            eprintln!("quotawatch: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
