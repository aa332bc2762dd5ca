//! The `quotawatch` binary: parse the command line, run it, report failure.

use clap::Parser;

/// mimalloc instead of the C library's allocator: a proxied call allocates
/// and frees some sixty small blocks (header maps, bodies, futures), on
/// whichever worker thread polls it, and glibc's malloc spent about an eighth
/// of the proxy's instructions on them (bench/instructions.sh).
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
