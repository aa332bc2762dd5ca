//! Forecasts and alert thresholds through the REST API: every limit's
//! forecast in the status document and the `forecast_exhaustion`
//! notification, threshold settings and their validation, and each crossing
//! announced once (on both backends, and across a restart). Two instances
//! sharing a crossing are in `tests/it/instances.rs`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::conformance::{Backend, Setup, conformance};
use crate::support::{ADMIN_KEY, TestServer, eventually};

/// The workspace's `threshold_crossed` notifications, history included:
/// percent, id and whether active, by percent.
async fn crossings(server: &TestServer, key: &str) -> Vec<(u64, String, bool)> {
    let mut found: Vec<(u64, String, bool)> = server
        .notification_history(key)
        .await
        .iter()
        .filter(|n| n["kind"] == "threshold_crossed")
        .map(|n| {
            (
                n["threshold"]["percent"].as_u64().expect("percent"),
                n["id"].as_str().expect("id").to_owned(),
                n["resolved_at"].is_null(),
            )
        })
        .collect();
    found.sort();
    found
}

/// Waits until the crossings are `percents` (each with whether active, in
/// any order), and answers them.
async fn crossings_become(
    server: &TestServer,
    key: &str,
    percents: &[(u64, bool)],
) -> Vec<(u64, String, bool)> {
    let mut wanted = percents.to_vec();
    wanted.sort();
    eventually(
        &format!("the crossings are {percents:?}"),
        Duration::from_secs(10),
        || async {
            let found = crossings(server, key).await;
            let mut shape: Vec<(u64, bool)> = found.iter().map(|(p, _, a)| (*p, *a)).collect();
            shape.sort();
            (shape == wanted).then_some(found)
        },
    )
    .await
}

async fn patch(server: &TestServer, workspace: &str, body: Value) -> crate::support::Response {
    server
        .send(
            Method::PATCH,
            &format!("/api/workspaces/{workspace}"),
            ADMIN_KEY,
            Some(body),
        )
        .await
}

conformance!(each_threshold_is_announced_once_per_crossing);
async fn each_threshold_is_announced_once_per_crossing(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme",
            "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_day": 1000},
            "alert_thresholds": {"default": [50, 80]}}))
        .await;
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    let first = crossings_become(server, &key, &[(50, true)]).await;
    let history = server.notification_history(&key).await;
    let crossed = history
        .iter()
        .find(|n| n["kind"] == "threshold_crossed")
        .expect("the crossing");
    assert_eq!(crossed["limit"], "tokens_per_day");
    assert_eq!(crossed["severity"], "info");
    assert_eq!(crossed["threshold"]["used"], 600);
    assert_eq!(crossed["threshold"]["limit"], 1000);
    assert_eq!(crossed["threshold"]["window"], "day");
    assert_eq!(
        crossed["resolves_at"], crossed["threshold"]["period_end"],
        "it ends with the day"
    );
    // More requests above 50 % announce nothing more; 80 % is announced.
    assert_eq!(server.check(&key, 100).await.status, StatusCode::OK);
    assert_eq!(server.check(&key, 150).await.status, StatusCode::OK);
    let both = crossings_become(server, &key, &[(50, true), (80, true)]).await;
    assert_eq!(both[0].1, first[0].1, "the same notification");
    // Raising the limit to 2,000 puts the 850 used below both.
    let raised = patch(server, "acme", json!({"limits": {"tokens_per_day": 2000}})).await;
    assert_eq!(raised.status, StatusCode::OK, "{:?}", raised.body);
    crossings_become(server, &key, &[(50, false), (80, false)]).await;
    // Crossed again under the new limit: a new notification.
    assert_eq!(server.check(&key, 200).await.status, StatusCode::OK);
    let again = crossings_become(server, &key, &[(50, true), (50, false), (80, false)]).await;
    let new_id = &again
        .iter()
        .find(|(_, _, active)| *active)
        .expect("active")
        .1;
    assert_ne!(new_id, &first[0].1);
    setup.finish().await;
}

/// A timezone whose local time is now between 06:00 and 18:00, so that a
/// day limit used up at its average pace runs out well before midnight.
pub(crate) fn a_timezone_at_midday() -> String {
    use chrono::Timelike;
    let hour = i64::from(chrono::Utc::now().hour());
    // Etc/GMT-N is N hours ahead of UTC; offsets from -10 to +12 exist.
    let ahead = (12 - hour).rem_euclid(24);
    match if ahead > 12 { ahead - 24 } else { ahead } {
        0 => "UTC".to_owned(),
        ahead => format!("Etc/GMT{:+}", -ahead),
    }
}

conformance!(a_day_running_out_at_its_pace_raises_a_forecast);
async fn a_day_running_out_at_its_pace_raises_a_forecast(backend: Backend, test: &str) {
    let Some(setup) = Setup::start(backend, test, &[]).await else {
        return;
    };
    let server = &setup.server;
    let key = server
        .workspace(json!({"id": "acme", "timezone": a_timezone_at_midday(),
            "limits": {"requests_per_minute": 100, "requests_per_day": null, "tokens_per_day": 1000},
            "alert_thresholds": {"default": []}}))
        .await;
    assert_eq!(server.check(&key, 999).await.status, StatusCode::OK);
    // Half a day's average pace uses the last token in under a minute.
    let status = eventually("the forecast alerts", Duration::from_secs(10), || async {
        let status = server.status(&key).await;
        let reasons = status["reasons"].as_array().cloned().unwrap_or_default();
        reasons
            .contains(&json!("tokens_per_day_forecast_exhaustion"))
            .then_some(status)
    })
    .await;
    assert_eq!(status["status"], "warning");
    let forecast = &status["limits"]["tokens_per_day"]["forecast"];
    assert_eq!(forecast["basis"], "period_average", "{forecast}");
    assert!(forecast["exhausts_at"].is_string(), "{forecast}");
    assert!(forecast["rate_per_hour"].as_f64().expect("a rate") > 0.0);
    let minute = &status["limits"]["requests_per_minute"]["forecast"];
    assert_eq!(minute["basis"], "recent_seconds", "{minute}");
    assert_eq!(minute["exhausts_at"], Value::Null, "one request in 10 s");
    let listed = server.get("/api/quota/notifications", &key).await.body;
    let notification = listed["notifications"]
        .as_array()
        .expect("notifications")
        .iter()
        .find(|n| n["kind"] == "forecast_exhaustion")
        .expect("the forecast's notification")
        .clone();
    assert_eq!(notification["limit"], "tokens_per_day");
    assert_eq!(notification["severity"], "warning");
    // Raised far enough, the day no longer runs out: resolved.
    let raised = patch(
        server,
        "acme",
        json!({"limits": {"tokens_per_day": 100_000_000}}),
    )
    .await;
    assert_eq!(raised.status, StatusCode::OK, "{:?}", raised.body);
    eventually("the forecast resolves", Duration::from_secs(10), || async {
        let history = server.notification_history(&key).await;
        history
            .iter()
            .any(|n| n["id"] == notification["id"] && !n["resolved_at"].is_null())
            .then_some(())
    })
    .await;
    let status = server.status(&key).await;
    assert_eq!(
        status["limits"]["tokens_per_day"]["forecast"]["exhausts_at"],
        Value::Null
    );
    setup.finish().await;
}

#[tokio::test]
async fn a_crossing_is_not_announced_again_after_a_restart() {
    let mut server = TestServer::start(&[]).await;
    let key = server
        .workspace(json!({"id": "acme",
            "limits": {"requests_per_minute": null, "requests_per_day": null, "tokens_per_day": 1000}}))
        .await;
    assert_eq!(server.check(&key, 600).await.status, StatusCode::OK);
    let before = crossings_become(&server, &key, &[(50, true)]).await;

    server.restart().await;

    assert_eq!(server.check(&key, 250).await.status, StatusCode::OK);
    let after = crossings_become(&server, &key, &[(50, true), (80, true)]).await;
    assert_eq!(
        after[0], before[0],
        "the 50 % crossing is the one from before"
    );
    let fifties = server
        .notification_history(&key)
        .await
        .iter()
        .filter(|n| n["kind"] == "threshold_crossed" && n["threshold"]["percent"] == 50)
        .count();
    assert_eq!(fifties, 1);
    server.stop().await;
}

#[tokio::test]
async fn thresholds_are_set_per_workspace_and_limit_and_validated() {
    let server = TestServer::start(&[]).await;
    server
        .workspace(json!({"id": "acme", "limits": {"usd_per_month": 100}}))
        .await;
    let read = server.get("/api/workspaces/acme", ADMIN_KEY).await;
    assert_eq!(
        read.body["alert_thresholds"],
        json!({"default": [50, 80, 95, 100], "limits": {}}),
        "the defaults"
    );
    let set = patch(
        &server,
        "acme",
        json!({"alert_thresholds": {"default": [90, 50, 90],
            "limits": {"usd_per_month": [25, 100], "requests_per_day": []}}}),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(
        set.body["alert_thresholds"],
        json!({"default": [50, 90], "limits": {"requests_per_day": [], "usd_per_month": [25, 100]}})
    );
    for (body, param) in [
        (json!({"default": [50, 150]}), "alert_thresholds.default[1]"),
        (
            json!({"limits": {"tokens_per_day": [12.5]}}),
            "alert_thresholds.limits.tokens_per_day[0]",
        ),
        (
            json!({"limits": {"requests_per_minute": [50]}}),
            "alert_thresholds.limits.requests_per_minute",
        ),
        (
            json!({"limits": {"tokens_per_week": [50]}}),
            "alert_thresholds.limits.tokens_per_week",
        ),
    ] {
        let refused = patch(&server, "acme", json!({ "alert_thresholds": body })).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(refused.body["error"]["param"], param, "{:?}", refused.body);
    }
    // Refusals changed nothing; `{}` sets the defaults back.
    let read = server.get("/api/workspaces/acme", ADMIN_KEY).await;
    assert_eq!(read.body["alert_thresholds"]["default"], json!([50, 90]));
    let reset = patch(&server, "acme", json!({"alert_thresholds": {}})).await;
    assert_eq!(
        reset.body["alert_thresholds"],
        json!({"default": [50, 80, 95, 100], "limits": {}})
    );
    server.stop().await;
}
