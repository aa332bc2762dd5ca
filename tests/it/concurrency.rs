//! Admission is atomic under concurrency.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_checks_against_a_limit_of_fifty_admit_exactly_fifty() {
    let server = TestServer::start(&[]).await;
    let key = server
        .workspace(
            json!({"id": "acme", "limits": {"requests_per_minute": 50, "requests_per_day": null}}),
        )
        .await;
    let calls = (0..200).map(|_| {
        let client = server.client.clone();
        let url = server.url("/api/quota/check");
        let key = key.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"estimated_tokens": 10}))
                .send()
                .await
                .expect("request")
                .status()
        })
    });
    let mut admitted = 0;
    let mut refused = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.expect("task") {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((admitted, refused), (50, 150));
    let status = server.status(&key).await;
    assert_eq!(status["limits"]["requests_per_minute"]["used"], 50);
    assert_eq!(status["errors"]["refused"], 150);
    server.stop().await;
}
