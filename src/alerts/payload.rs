//! The messages alert channels receive, as JSON: the webhook payload
//! (Standard Webhooks' envelope around quotawatch's versioned event data,
//! documented in README.md and `docs/webhook-payload.json`) and Slack's
//! Block Kit message. These are wire formats, so they live here at the
//! boundary and nowhere else.

use serde_json::{Value, json};

use crate::domain::alert::Phase;
use crate::domain::limits::{LimitKind, Unit};
use crate::domain::status::LimitFacts;
use crate::domain::time::Timestamp;
use crate::store::EventRecord;

/// The version of `data` in the webhook payload; raised when a field
/// changes meaning or goes away (new fields do not raise it).
pub const SCHEMA_VERSION: u32 = 1;

/// What an event is sent with beside its stored text: its workspace's
/// name, its limit's figures now (or at the crossing), and the link.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub workspace_name: Option<String>,
    pub limit: Option<(LimitKind, LimitFacts)>,
    pub dashboard_url: Option<String>,
}

/// `quotawatch.<event>.<raised|resolved>`.
pub fn event_type(event: &EventRecord) -> String {
    format!("quotawatch.{}.{}", event.kind, event.phase.name())
}

/// An amount in its limit's unit: a count, or dollars for usd.
fn amount(kind: LimitKind, value: u64) -> Value {
    match kind.metric.unit() {
        Unit::Count => value.into(),
        unit => json!(unit.decimal(value)),
    }
}

/// The `limit` object: from the crossing the event records, if it is one,
/// else the limit's figures when the event is sent.
fn limit_data(event: &EventRecord, context: &Context) -> Value {
    let kind = event.limit.as_deref().and_then(LimitKind::from_name);
    let (Some(kind), crossing) = (kind, event.crossing) else {
        return Value::Null;
    };
    let (used, max, resets_at) = match (crossing, &context.limit) {
        (Some(crossing), _) => (crossing.used, crossing.max, Some(crossing.period_end)),
        (None, Some((live, facts))) if *live == kind => (facts.used, facts.max, facts.resets_at),
        (None, _) => {
            return json!({"name": kind.name(), "used": null, "max": null, "percent": null, "resets_at": null});
        }
    };
    let percent = if max == 0 {
        100.0
    } else {
        (used as f64 / max as f64 * 1000.0).round() / 10.0
    };
    json!({
        "name": kind.name(),
        "used": amount(kind, used),
        "max": amount(kind, max),
        "percent": percent,
        "resets_at": resets_at.map(Timestamp::to_rfc3339),
    })
}

fn forecast_data(event: &EventRecord, context: &Context) -> Value {
    let Some((kind, facts)) = &context.limit else {
        return Value::Null;
    };
    if event.limit.as_deref() != Some(kind.name()) {
        return Value::Null;
    }
    let Some(forecast) = facts.forecast else {
        return Value::Null;
    };
    let rate = match kind.metric.unit() {
        Unit::Count => forecast.rate_per_hour,
        Unit::Dollars => forecast.rate_per_hour / crate::domain::price::NANO_USD_PER_DOLLAR as f64,
    };
    json!({
        "exhausts_at": forecast.exhausts_at.map(Timestamp::to_rfc3339),
        "rate_per_hour": (rate * 1000.0).round() / 1000.0,
        "basis": forecast.basis.name(),
    })
}

/// The event's `data` object (schema version 1).
pub fn event_data(event: &EventRecord, context: &Context) -> Value {
    json!({
        "schema_version": SCHEMA_VERSION,
        "event_id": event.id,
        "notification_id": event.notification_id,
        "event": event.kind,
        "phase": event.phase.name(),
        "severity": event.severity.name(),
        "occurred_at": event.occurred_at.to_rfc3339(),
        "workspace": event.workspace.as_ref().map(|id| json!({
            "id": id.as_str(),
            "name": context.workspace_name,
        })),
        "title": event.title,
        "message": event.message,
        "limit": limit_data(event, context),
        "forecast": forecast_data(event, context),
        "resolves_at": event.resolves_at.map(Timestamp::to_rfc3339),
        "suggested_actions": event.suggested_actions,
        "dashboard_url": context.dashboard_url,
    })
}

/// The webhook body of one event, sent at `now`.
pub fn webhook(event: &EventRecord, context: &Context, now: Timestamp) -> Value {
    json!({
        "type": event_type(event),
        "timestamp": now.to_rfc3339(),
        "data": event_data(event, context),
    })
}

/// The webhook body of a digest: several events in one message.
pub fn webhook_digest(events: &[(&EventRecord, Context)], now: Timestamp) -> Value {
    json!({
        "type": "quotawatch.digest",
        "timestamp": now.to_rfc3339(),
        "data": {
            "schema_version": SCHEMA_VERSION,
            "count": events.len(),
            "events": events
                .iter()
                .map(|(event, context)| json!({"type": event_type(event), "data": event_data(event, context)}))
                .collect::<Vec<_>>(),
        },
    })
}

fn status_word(event: &EventRecord) -> String {
    match event.phase {
        Phase::Raised => format!("{} (raised)", event.severity.name()),
        Phase::Resolved => "resolved".to_owned(),
    }
}

/// Slack's `mrkdwn` escapes: `&`, `<` and `>` would start entities and
/// links.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Slack caps a section's text at 3000 characters and a header's at 150.
fn clip(text: &str, most: usize) -> String {
    if text.chars().count() <= most {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(most - 1).collect();
    clipped.push('…');
    clipped
}

fn field(label: &str, value: String) -> Value {
    json!({"type": "mrkdwn", "text": clip(&format!("*{label}*\n{}", escape(&value)), 2000)})
}

/// The Block Kit message of one event: a header, the message, the
/// figures as fields, the suggested actions and a button to the dashboard.
pub fn slack(event: &EventRecord, context: &Context) -> Value {
    let data = event_data(event, context);
    let mut fields = vec![
        field("Status", status_word(event)),
        field(
            "Workspace",
            match (&event.workspace, &context.workspace_name) {
                (Some(id), Some(name)) => format!("{name} ({})", id.as_str()),
                (Some(id), None) => id.as_str().to_owned(),
                (None, _) => "all (service-wide)".to_owned(),
            },
        ),
    ];
    let limit = &data["limit"];
    if let Some(name) = limit["name"].as_str() {
        fields.push(field(
            "Used",
            format!(
                "{} of {} ({}%) — {name}",
                limit["used"], limit["max"], limit["percent"]
            ),
        ));
        if let Some(resets_at) = limit["resets_at"].as_str() {
            fields.push(field("Resets at", resets_at.to_owned()));
        }
    }
    if let Some(exhausts_at) = data["forecast"]["exhausts_at"].as_str() {
        fields.push(field("Forecast", format!("runs out at {exhausts_at}")));
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": clip(&event.title, 150)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&escape(&event.message), 3000)}}),
        json!({"type": "section", "fields": fields}),
    ];
    if !event.suggested_actions.is_empty() {
        let list: Vec<String> = event
            .suggested_actions
            .iter()
            .map(|action| format!("• {}", escape(action)))
            .collect();
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&format!("*Suggested actions*\n{}", list.join("\n")), 3000)}}));
    }
    if let Some(url) = &context.dashboard_url {
        blocks.push(json!({"type": "actions", "elements": [{
            "type": "button",
            "text": {"type": "plain_text", "text": "Open the dashboard"},
            "url": url,
        }]}));
    }
    json!({
        "text": clip(&format!("{} — {}", event.title, status_word(event)), 3000),
        "blocks": blocks,
    })
}

/// The Block Kit message of a digest: one line per event (a digest holds
/// at most the events one claim takes, which one section holds).
pub fn slack_digest(events: &[(&EventRecord, Context)], dashboard_url: Option<&str>) -> Value {
    let title = format!("{} quotawatch alerts", events.len());
    let lines: Vec<String> = events
        .iter()
        .map(|(event, _)| {
            let workspace = event
                .workspace
                .as_ref()
                .map_or("service-wide", |id| id.as_str());
            format!(
                "• *{}* ({workspace}, {})",
                escape(&event.title),
                status_word(event)
            )
        })
        .collect();
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": title}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&lines.join("\n"), 3000)}}),
    ];
    if let Some(url) = dashboard_url {
        blocks.push(json!({"type": "actions", "elements": [{
            "type": "button",
            "text": {"type": "plain_text", "text": "Open the dashboard"},
            "url": url,
        }]}));
    }
    json!({"text": title, "blocks": blocks})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::notification::{Crossing, Severity};

    /// The field names of `value`, nested objects as `parent.child`.
    fn shape(value: &Value, prefix: &str, into: &mut Vec<String>) {
        if let Value::Object(map) = value {
            for (key, child) in map {
                let path = format!("{prefix}{key}");
                shape(child, &format!("{path}."), into);
                into.push(path);
            }
        }
    }

    /// The documented example has exactly the fields the payload has, so
    /// that the documentation cannot drift from what receivers get.
    #[test]
    fn the_documented_example_has_the_payloads_fields() {
        let event = EventRecord {
            id: "ntf_1:raised".into(),
            notification_id: "ntf_1".into(),
            phase: Phase::Raised,
            workspace: Some("acme".parse().expect("id")),
            kind: "threshold_crossed".into(),
            severity: Severity::Warning,
            title: "t".into(),
            message: "m".into(),
            suggested_actions: vec!["a".into()],
            limit: Some("tokens_per_day".into()),
            crossing: Some(Crossing {
                percent: 80,
                used: 80,
                max: 100,
                period_start: Timestamp::from_millis(0),
                period_end: Timestamp::from_millis(86_400_000),
            }),
            resolves_at: Some(Timestamp::from_millis(86_400_000)),
            occurred_at: Timestamp::from_millis(1),
        };
        let forecast = crate::domain::forecast::Forecast {
            exhausts_at: Some(Timestamp::from_millis(2)),
            rate_per_hour: 1.0,
            basis: crate::domain::forecast::Basis::Smoothed,
            runs_out_at: Some(Timestamp::from_millis(2)),
        };
        let context = Context {
            workspace_name: Some("Acme".into()),
            limit: LimitKind::from_name("tokens_per_day").map(|kind| {
                (
                    kind,
                    LimitFacts {
                        max: 100,
                        used: 80,
                        resets_at: None,
                        frees_at: None,
                        forecast: Some(forecast),
                    },
                )
            }),
            dashboard_url: Some("https://quota.example.com/#/w/acme".into()),
        };
        let sent = webhook(&event, &context, Timestamp::from_millis(3));
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/webhook-payload.json");
        let documented: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("the example"))
                .expect("JSON");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        shape(&sent, "", &mut ours);
        shape(&documented, "", &mut theirs);
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
        assert_eq!(sent["data"]["limit"]["percent"], 80.0);
    }
}
