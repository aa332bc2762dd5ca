//! The email an email channel is sent: stored events turned back into the
//! notifications `crate::mail` lays out (`mail::compose`, `compose_test`
//! and, for several at once, `compose_digest`), so that an alert reads the
//! same however it was queued.

use crate::domain::alert::{Phase, TEST_EVENT};
use crate::domain::limits::LimitKind;
use crate::domain::notification::{Notification, NotificationKind};
use crate::domain::time::Timestamp;
use crate::mail::{self, Alert, Email};
use crate::store::EventRecord;

use super::payload::Context;

/// One event to mail, with what it is sent with and when its notification
/// was raised (a resolution's event carries only when it ended).
pub struct Mailed<'a> {
    pub event: &'a EventRecord,
    pub context: Context,
    pub raised_at: Timestamp,
}

/// The notification `event` reports, as it read when the event was
/// stored; `None` for a test event and for a kind this version does not
/// know.
pub fn notification_of(event: &EventRecord, raised_at: Timestamp) -> Option<Notification> {
    let kind = NotificationKind::from_name(&event.kind)?;
    Some(Notification {
        id: event.notification_id.clone(),
        workspace: event.workspace.clone(),
        cause: None,
        severity: event.severity,
        kind,
        title: event.title.clone(),
        message: event.message.clone(),
        suggested_actions: event.suggested_actions.clone(),
        tenant: Default::default(),
        limit: event.limit.as_deref().and_then(LimitKind::from_name),
        crossing: event.crossing,
        created_at: raised_at,
        resolves_at: event.resolves_at,
        resolved_at: (event.phase == Phase::Resolved).then_some(event.occurred_at),
    })
}

/// The alert of `notification` as `mailed` sends it: the workspace's name
/// and its limit's figures now, when they are of the notification's limit.
fn alert<'a>(
    notification: &'a Notification,
    mailed: &'a Mailed<'_>,
    dashboard: Option<&'a reqwest::Url>,
) -> Alert<'a> {
    let workspace_name = mailed.context.workspace_name.as_deref().unwrap_or_else(|| {
        notification
            .workspace
            .as_ref()
            .map_or("", |workspace| workspace.as_str())
    });
    Alert {
        notification,
        workspace_name,
        phase: mailed.event.phase,
        limit: mailed
            .context
            .limit
            .filter(|(kind, _)| Some(*kind) == notification.limit)
            .map(|(_, facts)| facts),
        dashboard,
    }
}

/// The one email that carries `mailed` (one event, or several as a
/// digest), or why it cannot be written.
pub fn compose(
    mailed: &[Mailed<'_>],
    dashboard: Option<&reqwest::Url>,
    now: Timestamp,
) -> Result<Email, String> {
    let mut tests = 0;
    let mut notifications = Vec::with_capacity(mailed.len());
    for one in mailed {
        if one.event.kind == TEST_EVENT {
            tests += 1;
            continue;
        }
        let notification = notification_of(one.event, one.raised_at).ok_or_else(|| {
            format!(
                "the event {:?} is of a kind this version cannot write as an email",
                one.event.kind
            )
        })?;
        notifications.push((notification, one));
    }
    Ok(match (&notifications[..], mailed) {
        ([(notification, one)], [_]) => mail::compose(&alert(notification, one, dashboard), now),
        ([], [test]) => mail::compose_test(
            test.context.workspace_name.as_deref().or_else(|| {
                test.event
                    .workspace
                    .as_ref()
                    .map(|workspace| workspace.as_str())
            }),
            dashboard,
            now,
        ),
        _ => {
            let alerts: Vec<Alert<'_>> = notifications
                .iter()
                .map(|(notification, one)| alert(notification, one, dashboard))
                .collect();
            mail::compose_digest(&alerts, tests, dashboard, now)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::forecast::{Basis, Forecast};
    use crate::domain::notification::{Crossing, Severity};
    use crate::domain::status::LimitFacts;

    const HOUR: i64 = 3_600_000;
    const NOW: Timestamp = Timestamp::from_millis(1_764_000_000_000);

    /// The stored event of a crossing of 80% of acme's day of 100,000
    /// tokens, raised an hour before `NOW`.
    fn crossing(phase: Phase) -> EventRecord {
        let occurred_at = match phase {
            Phase::Raised => Timestamp::from_millis(NOW.millis() - HOUR),
            Phase::Resolved => NOW,
        };
        EventRecord {
            id: EventRecord::id_of("ntf_1", phase),
            notification_id: "ntf_1".into(),
            phase,
            workspace: Some("acme".parse().expect("id")),
            kind: "threshold_crossed".into(),
            severity: Severity::Warning,
            title: "Workspace acme crossed 80% of tokens_per_day".into(),
            message: "80,500 of 100,000 tokens used today.".into(),
            suggested_actions: vec!["Raise tokens_per_day.".into()],
            limit: Some("tokens_per_day".into()),
            crossing: Some(Crossing {
                percent: 80,
                used: 80_500,
                max: 100_000,
                period_start: Timestamp::from_millis(NOW.millis() - 10 * HOUR),
                period_end: Timestamp::from_millis(NOW.millis() + 14 * HOUR),
            }),
            resolves_at: None,
            occurred_at,
        }
    }

    fn mailed(event: &EventRecord, context: Context) -> Mailed<'_> {
        Mailed {
            event,
            context,
            raised_at: Timestamp::from_millis(NOW.millis() - HOUR),
        }
    }

    fn named(name: &str) -> Context {
        Context {
            workspace_name: Some(name.into()),
            ..Context::default()
        }
    }

    #[test]
    fn an_event_becomes_the_notification_it_was_stored_from() {
        let raised = crossing(Phase::Raised);
        let notification = notification_of(&raised, raised.occurred_at).expect("a known kind");
        assert_eq!(notification.id, "ntf_1");
        assert_eq!(notification.kind, NotificationKind::ThresholdCrossed);
        assert_eq!(notification.severity, Severity::Warning);
        assert_eq!(notification.title, raised.title);
        assert_eq!(notification.message, raised.message);
        assert_eq!(notification.suggested_actions, raised.suggested_actions);
        assert_eq!(
            notification.limit,
            LimitKind::from_name("tokens_per_day"),
            "the limit's name is read back"
        );
        assert_eq!(notification.crossing, raised.crossing);
        assert_eq!(notification.created_at, raised.occurred_at);
        assert_eq!(notification.resolved_at, None);

        // A resolution ends at its event, and was raised when the caller
        // says.
        let resolved = crossing(Phase::Resolved);
        let raised_at = Timestamp::from_millis(NOW.millis() - 2 * HOUR);
        let notification = notification_of(&resolved, raised_at).expect("a known kind");
        assert_eq!(notification.created_at, raised_at);
        assert_eq!(notification.resolved_at, Some(NOW));

        let test = EventRecord {
            kind: TEST_EVENT.into(),
            ..crossing(Phase::Raised)
        };
        assert_eq!(notification_of(&test, NOW), None);
    }

    #[test]
    fn one_event_is_mailed_as_its_own_alert_with_the_live_figures() {
        let event = crossing(Phase::Raised);
        let facts = LimitFacts {
            max: 100_000,
            used: 90_000,
            resets_at: Some(Timestamp::from_millis(NOW.millis() + 5 * HOUR)),
            frees_at: None,
            forecast: Some(Forecast {
                exhausts_at: Some(Timestamp::from_millis(NOW.millis() + 2 * HOUR)),
                rate_per_hour: 5_000.0,
                basis: Basis::Smoothed,
                runs_out_at: Some(Timestamp::from_millis(NOW.millis() + 2 * HOUR)),
            }),
        };
        let context = Context {
            limit: LimitKind::from_name("tokens_per_day").map(|kind| (kind, facts)),
            ..named("Acme Corp")
        };
        let dashboard: reqwest::Url = "https://quota.example.com/".parse().expect("url");
        let email = compose(&[mailed(&event, context)], Some(&dashboard), NOW).expect("an email");
        assert_eq!(
            email.subject,
            "[quotawatch] Acme Corp: 80% of tokens_per_day used"
        );
        assert!(
            email.text.contains("90,000 of 100,000 tokens (90%)"),
            "{}",
            email.text
        );
        assert!(email.text.contains("runs out in 2h 0m"), "{}", email.text);
        assert!(
            email.text.contains("- Raise tokens_per_day."),
            "{}",
            email.text
        );
        assert!(email.text.contains("https://quota.example.com/#/w/acme"));

        // Figures of another limit are not this alert's: the crossing's are
        // shown.
        let other = Context {
            limit: LimitKind::from_name("requests_per_day").map(|kind| (kind, facts)),
            ..named("Acme Corp")
        };
        let email = compose(&[mailed(&event, other)], None, NOW).expect("an email");
        assert!(
            email.text.contains("80,500 of 100,000 tokens (80%)"),
            "{}",
            email.text
        );

        let resolved = crossing(Phase::Resolved);
        let email = compose(&[mailed(&resolved, named("Acme Corp"))], None, NOW).expect("email");
        assert_eq!(
            email.subject,
            "[quotawatch] Acme Corp: resolved: 80% of tokens_per_day used"
        );
    }

    #[test]
    fn several_events_go_as_one_digest_with_the_count_in_its_subject() {
        let raised = crossing(Phase::Raised);
        let resolved = crossing(Phase::Resolved);
        let test = EventRecord {
            kind: TEST_EVENT.into(),
            ..crossing(Phase::Raised)
        };
        let email = compose(
            &[
                mailed(&raised, named("Acme")),
                mailed(&resolved, named("Acme")),
                mailed(&test, named("Acme")),
            ],
            None,
            NOW,
        )
        .expect("a digest");
        assert_eq!(email.subject, "[quotawatch] 3 alerts");
        for line in [
            "- Acme: 80% of tokens_per_day used (warning, raised)",
            "- Acme: resolved: 80% of tokens_per_day used (warning, resolved)",
            "- test alert",
        ] {
            assert!(email.text.contains(line), "{line}: {}", email.text);
        }
        assert_eq!(email.html.matches("<li>").count(), 3, "{}", email.html);
    }

    #[test]
    fn a_test_event_is_the_test_email_and_an_unknown_kind_is_refused() {
        let test = EventRecord {
            kind: TEST_EVENT.into(),
            ..crossing(Phase::Raised)
        };
        let email = compose(&[mailed(&test, named("Acme"))], None, NOW).expect("an email");
        assert_eq!(email.subject, "[quotawatch] Acme: test alert");

        let unknown = EventRecord {
            kind: "sunrise".into(),
            ..crossing(Phase::Raised)
        };
        let refused = compose(&[mailed(&unknown, named("Acme"))], None, NOW).expect_err("refused");
        assert!(refused.contains("sunrise"), "{refused}");
    }
}
