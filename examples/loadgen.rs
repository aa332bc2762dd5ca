//! A small HTTP load generator for `bench/proxy.sh`.
//!
//! Two modes:
//! - `--rate R`: open loop at a fixed rate of R requests per second. Latency
//!   is measured from when each request was *due*, so a stalled server is
//!   charged for the requests it delayed (no coordinated omission).
//! - `--connections C`: closed loop, C requests in flight at all times, for
//!   throughput.
//!
//! Prints one JSON line: requests, errors, requests/s, latency percentiles
//! and, when the server reports it, the percentiles of
//! `x-quotawatch-overhead-ms`.
//!
//! `cargo run --release --example loadgen -- --url URL --body FILE
//!  [--key KEY] (--rate R | --connections C) --duration 10s`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

struct Args {
    url: String,
    body: Vec<u8>,
    key: Option<String>,
    rate: Option<u64>,
    connections: Option<usize>,
    duration: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut body = None;
    let mut key = None;
    let mut rate = None;
    let mut connections = None;
    let mut duration = Duration::from_secs(10);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--body" => {
                let path = value()?;
                body = Some(std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?);
            }
            "--key" => key = Some(value()?),
            "--rate" => rate = Some(value()?.parse().map_err(|_| "--rate takes a number")?),
            "--connections" => {
                connections = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--connections takes a number")?,
                )
            }
            "--duration" => {
                let text = value()?;
                duration = quotawatch::domain::time::parse_duration(&text)
                    .ok_or_else(|| format!("{text:?} is not a duration"))?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        url: url.ok_or("--url is required")?,
        body: body.ok_or("--body is required")?,
        key,
        rate,
        connections,
        duration,
    })
}

#[derive(Default)]
struct Results {
    latencies: Vec<Duration>,
    overheads: Vec<f64>,
    errors: u64,
}

async fn one(client: &reqwest::Client, args: &Args, due: Instant, results: &Mutex<Results>) {
    let mut request = client
        .post(&args.url)
        .header("content-type", "application/json")
        .body(args.body.clone());
    if let Some(key) = &args.key {
        request = request.bearer_auth(key);
    }
    let outcome = async {
        let response = request.send().await.ok()?;
        let ok = response.status().is_success();
        let overhead = response
            .headers()
            .get("x-quotawatch-overhead-ms")
            .and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
        response.bytes().await.ok()?;
        Some((ok, overhead))
    }
    .await;
    let took = due.elapsed();
    let mut results = results.lock().await;
    match outcome {
        Some((true, overhead)) => {
            results.latencies.push(took);
            results.overheads.extend(overhead);
        }
        _ => results.errors += 1,
    }
}

fn percentile_ms(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => Arc::new(args),
        Err(error) => {
            eprintln!("loadgen: {error}");
            std::process::exit(2);
        }
    };
    quotawatch::telemetry::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let results = Arc::new(Mutex::new(Results::default()));
    let started = Instant::now();
    let end = started + args.duration;
    let mut tasks = Vec::new();
    match (args.rate, args.connections) {
        (Some(rate), _) => {
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut due = started;
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                let (client, args, results) = (client.clone(), args.clone(), results.clone());
                tasks.push(tokio::spawn(async move {
                    one(&client, &args, due, &results).await
                }));
                due += period;
            }
        }
        (None, connections) => {
            for _ in 0..connections.unwrap_or(64) {
                let (client, args, results) = (client.clone(), args.clone(), results.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        one(&client, &args, Instant::now(), &results).await;
                    }
                }));
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let results = results.lock().await;
    let mut latencies: Vec<f64> = results
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mut overheads = results.overheads.clone();
    overheads.sort_by(f64::total_cmp);
    let summary = serde_json::json!({
        "requests": latencies.len(),
        "errors": results.errors,
        "rps": latencies.len() as f64 / elapsed,
        "p50_ms": percentile_ms(&latencies, 0.50),
        "p99_ms": percentile_ms(&latencies, 0.99),
        "p999_ms": percentile_ms(&latencies, 0.999),
        "overhead_p50_ms": percentile_ms(&overheads, 0.50),
        "overhead_p99_ms": percentile_ms(&overheads, 0.99),
    });
    println!("{summary}");
}
