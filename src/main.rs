//! The `quotawatch` binary: parse the command line, run it, report failure.

use clap::Parser;

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
