//! Redis for tests: the server named by `QUOTAWATCH_TEST_REDIS_URL`, a random
//! key prefix per test (so tests share the server and run in parallel), and
//! a TCP relay in front of it that a test can cut to make Redis unreachable.
//! Without the variable, tests that need Redis say they are skipped and pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::aio::MultiplexedConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The server to use, or `None` after printing why the caller is skipped.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var("QUOTAWATCH_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: {test} needs Redis; set QUOTAWATCH_TEST_REDIS_URL=redis://...");
            None
        }
    }
}

/// A key prefix no other test uses.
pub fn fresh_prefix() -> String {
    let bytes: [u8; 6] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("qwtest:{hex}:")
}

/// The `host:port` of a `redis://host:port[/db]` URL.
fn address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// A connection to the Redis at `url`, and the keys matching `pattern`.
pub async fn keys(url: &str, pattern: &str) -> (MultiplexedConnection, Vec<String>) {
    let client = redis::Client::open(url).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut connection)
        .await
        .expect("KEYS");
    (connection, keys)
}

/// Deletes every key under `prefix`, so tests leave nothing behind.
pub async fn clean(url: &str, prefix: &str) {
    let (mut connection, keys) = keys(url, &format!("{prefix}*")).await;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut connection)
            .await
            .expect("DEL");
    }
}

/// A TCP relay in front of Redis. `cut` drops every connection and refuses
/// new ones, as a network partition would; `restore` lets them through
/// again.
pub struct Relay {
    pub url: String,
    cut: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target_url: &str) -> Self {
        let target = address(target_url);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let url = format!("redis://{}", listener.local_addr().expect("address"));
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let cut = cut.clone();
            let generation = generation.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    // Subscribed before the flag is read, so that a cut
                    // made in between still ends this connection.
                    let mut cuts = generation.subscribe();
                    if cut.load(Ordering::Acquire) {
                        drop(client);
                        continue;
                    }
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        // The cut is looked at first whenever the connection
                        // wakes: nothing sent after `cut` returned reaches
                        // Redis, as when a cable is pulled.
                        tokio::select! {
                            biased;
                            _ = cuts.changed() => {}
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        }
                    });
                }
            }
        });
        Self {
            url,
            cut,
            generation,
            task,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.generation.send_modify(|generation| *generation += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|generation| *generation += 1);
    }
}
