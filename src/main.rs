//! The `quotawatch` binary: parse the command line, run it, report failure.

use clap::Parser;

/// mimalloc instead of the C library's allocator: a proxied call allocates
/// and frees about a hundred small blocks (header maps, bodies, futures), on
/// whichever worker thread polls it, and glibc's malloc spent about an eighth
/// of the proxy's instructions on them (bench/instructions.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
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

/// Keeps the kernel from backing this process's memory with 2 MiB pages.
/// mimalloc commits its arenas in large aligned spans; with transparent huge
/// pages each span touched became resident whole, and the resident memory
/// under load went from 42 to 70 MiB (bench/proxy.sh). mimalloc is built not
/// to ask for them (its `no_thp` feature), which is enough where the kernel
/// gives them only when asked; this covers kernels set to give them always.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and touches no
    // memory of the process; on a kernel without it, the call fails with
    // EINVAL and changes nothing, which is fine.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
