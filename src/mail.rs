//! Email alerts over SMTP: the server's settings, the `Mailer` that
//! delivers a message, and the message an alert becomes (`compose`).
//!
//! A delivery is one connection: alerts are rare, so a pool would only hold
//! connections a relay closes anyway. TLS is rustls with the ring provider
//! and the platform's roots (plus an extra root the operator names, for a
//! private relay), as the proxy's HTTPS client uses them. A failed delivery
//! says whether trying again later can help ([`MailError::Transient`]: no
//! connection, a timeout, a 4xx reply) or not ([`MailError::Permanent`]: a
//! 5xx reply, a refused certificate, a bad address), so that whoever queues
//! alerts can apply its retry policy.
//!
//! The words of an alert are the domain's (`domain::notification`: the title,
//! the message and the suggested actions); this module only lays them out
//! with the limit's numbers, its forecast and a link, as plain text and as
//! HTML in which every value is escaped.

use std::fmt::Write as _;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

pub use crate::domain::alert::Phase;
use crate::domain::forecast::Basis;
use crate::domain::limits::{LimitKind, WorkspaceId};
use crate::domain::notification::{Notification, NotificationKind};
use crate::domain::status::LimitFacts;
use crate::domain::time::{Timestamp, humanize_duration, in_time};
use crate::keys::Secret;

pub use lettre::Address;

/// The most recipients one alert is sent to: a list longer than a team's is
/// more likely a mistake (or a way to use quotawatch to send mail) than a
/// need.
pub const MAX_RECIPIENTS: usize = 20;

/// The longest address accepted (RFC 5321's limit on a path).
pub const MAX_ADDRESS_LEN: usize = 254;

/// The longest subject line, in characters; a longer one is cut.
const MAX_SUBJECT_CHARS: usize = 160;

// ----- settings ---------------------------------------------------------------------------

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// TLS from the first byte (`smtps://`, port 465 by default).
    ImplicitTls,
    /// A plain connection upgraded with STARTTLS before anything else is
    /// sent, or no delivery at all (`smtp://`, port 587 by default).
    StartTls,
    /// No encryption, only when the URL asks for it with `?tls=none`.
    Plain,
}

/// The SMTP server, as `QUOTAWATCH_SMTP_URL` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpServer {
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// The user name and password to authenticate with, when the URL has them.
    pub credentials: Option<(String, Secret)>,
}

impl SmtpServer {
    /// Reads `smtps://USER:PASSWORD@HOST[:PORT]` (implicit TLS),
    /// `smtp://USER:PASSWORD@HOST[:PORT][?tls=required]` (STARTTLS, required)
    /// or `smtp://HOST[:PORT]?tls=none` (no encryption, and then no
    /// password). The user and password are percent-decoded.
    pub fn parse(text: &str) -> Result<Self, String> {
        let shown = crate::telemetry::mask_secrets(text);
        let url = reqwest::Url::parse(text).map_err(|error| {
            format!(
                "{shown:?} is not a URL such as smtps://user:password@mail.example.com:465 ({error})"
            )
        })?;
        let implicit = match url.scheme() {
            "smtps" => true,
            "smtp" => false,
            other => {
                return Err(format!(
                    "{shown:?} has the scheme {other:?}: use smtps:// (TLS) or smtp:// (STARTTLS)"
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| format!("{shown:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !matches!(url.path(), "" | "/") || url.fragment().is_some() {
            return Err(format!(
                "{shown:?} has a path or a fragment, which an SMTP server has no use for"
            ));
        }
        let mut tls = None;
        for (name, value) in url.query_pairs() {
            match (name.as_ref(), tls) {
                ("tls", None) => tls = Some(value.into_owned()),
                ("tls", Some(_)) => return Err(format!("{shown:?} names tls twice")),
                (other, _) => {
                    return Err(format!(
                        "{shown:?} has the parameter {other:?}; the only one is tls=required or tls=none"
                    ));
                }
            }
        }
        let security = match (implicit, tls.as_deref()) {
            (true, None | Some("required")) => Security::ImplicitTls,
            (true, Some("none")) => {
                return Err(format!(
                    "{shown:?} asks for smtps:// without TLS: use smtp://HOST?tls=none for a plain connection"
                ));
            }
            (false, None | Some("required")) => Security::StartTls,
            (false, Some("none")) => Security::Plain,
            (_, Some(other)) => {
                return Err(format!(
                    "{shown:?} has tls={other:?}, which is neither required nor none"
                ));
            }
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (_, None | Some("")) => {
                return Err(format!("{shown:?} names a user without a password"));
            }
            (user, Some(password)) => Some((decoded(user)?, Secret::new(&decoded(password)?))),
        };
        if credentials.is_some() && security == Security::Plain {
            return Err(format!(
                "{shown:?} would send its password unencrypted: drop tls=none, or the password"
            ));
        }
        let port = url.port().unwrap_or(match security {
            Security::ImplicitTls => 465,
            Security::StartTls => 587,
            Security::Plain => 25,
        });
        Ok(Self {
            host,
            port,
            security,
            credentials,
        })
    }
}

/// A user name or password as written in a URL, percent-decoded.
fn decoded(text: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "the user or password is not UTF-8 once percent-decoded".to_owned())
}

/// The sender of alerts, `QUOTAWATCH_SMTP_FROM`: an address, or a name and
/// an address (`quotawatch <alerts@example.com>`).
pub fn parse_sender(text: &str) -> Result<Mailbox, String> {
    if text.len() > MAX_ADDRESS_LEN * 2 {
        return Err(format!("is longer than {} bytes", MAX_ADDRESS_LEN * 2));
    }
    text.parse::<Mailbox>().map_err(|_| {
        format!("{text:?} is not an address such as alerts@example.com or quotawatch <alerts@example.com>")
    })
}

/// A root certificate to trust beside the platform's, `QUOTAWATCH_SMTP_CA_FILE`
/// (and `QUOTAWATCH_UPSTREAM_CA_FILE`, which the proxy reads the same way):
/// the PEM text of the file, checked when the settings are read.
#[derive(Clone, PartialEq, Eq)]
pub struct ExtraRoot(Vec<u8>);

impl ExtraRoot {
    /// The PEM text of the file.
    pub fn pem(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for ExtraRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraRoot({} bytes of PEM)", self.0.len())
    }
}

/// Reads the PEM file at `path` and checks that it holds a certificate.
pub fn read_extra_root(path: &str) -> Result<ExtraRoot, String> {
    let pem = std::fs::read(path).map_err(|error| format!("cannot read {path:?}: {error}"))?;
    let holds_certificate = String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----");
    if !holds_certificate || Certificate::from_pem(&pem).is_err() {
        return Err(format!("{path:?} holds no PEM certificate"));
    }
    Ok(ExtraRoot(pem))
}

/// Everything a `Mailer` is made of, read from the settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpConfig {
    pub server: SmtpServer,
    pub from: Mailbox,
    pub extra_root: Option<ExtraRoot>,
    /// The longest one delivery may take, from connecting to the server's
    /// last answer.
    pub timeout: Duration,
}

/// Reads a list of recipients: each an address of at most
/// [`MAX_ADDRESS_LEN`] bytes, none twice, one to [`MAX_RECIPIENTS`] of them.
pub fn parse_recipients<S: AsRef<str>>(list: &[S]) -> Result<Vec<Address>, RecipientError> {
    if list.is_empty() || list.len() > MAX_RECIPIENTS {
        return Err(RecipientError {
            index: None,
            message: format!(
                "between 1 and {MAX_RECIPIENTS} recipients are needed, not {}",
                list.len()
            ),
        });
    }
    let mut addresses: Vec<Address> = Vec::with_capacity(list.len());
    for (index, text) in list.iter().map(AsRef::as_ref).enumerate() {
        let refused = |message: String| RecipientError {
            index: Some(index),
            message,
        };
        if text.len() > MAX_ADDRESS_LEN {
            return Err(refused(format!(
                "an address is at most {MAX_ADDRESS_LEN} bytes"
            )));
        }
        let address: Address = text.parse().map_err(|_| {
            refused(format!(
                "{text:?} is not an address such as ops@example.com"
            ))
        })?;
        if addresses.contains(&address) {
            return Err(refused(format!("{text:?} is listed twice")));
        }
        addresses.push(address);
    }
    Ok(addresses)
}

/// A list of recipients that cannot be used; `index` is the refused entry's
/// position, `None` when the list as a whole is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RecipientError {
    pub index: Option<usize>,
    pub message: String,
}

impl RecipientError {
    /// The field at fault in a list named `list`: `list[i]` for one entry,
    /// `list` for the whole.
    pub fn field(&self, list: &str) -> String {
        match self.index {
            Some(index) => format!("{list}[{index}]"),
            None => list.to_owned(),
        }
    }
}

// ----- delivery ---------------------------------------------------------------------------

/// Why a message was not delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    /// Trying again later may succeed: the server could not be reached, did
    /// not answer in time, or answered 4xx.
    #[error("email not delivered for now: {0}")]
    Transient(String),
    /// Trying again will not help: the server answered 5xx (a refused
    /// recipient, sender or password), its certificate is not trusted, or
    /// the message cannot be built.
    #[error("email refused: {0}")]
    Permanent(String),
}

impl MailError {
    pub fn is_transient(&self) -> bool {
        matches!(self, MailError::Transient(_))
    }
}

/// The SMTP server's client, built once from the settings.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
}

impl Mailer {
    /// The client for `config`; fails only if its TLS settings cannot be
    /// used (the platform verifier cannot start, say).
    pub fn new(config: &SmtpConfig) -> Result<Self, String> {
        let server = &config.server;
        let tls = |wrap: fn(TlsParameters) -> Tls| -> Result<Tls, String> {
            let mut parameters = TlsParameters::builder(server.host.clone());
            if let Some(ExtraRoot(pem)) = &config.extra_root {
                let root = Certificate::from_pem(pem)
                    .map_err(|error| format!("QUOTAWATCH_SMTP_CA_FILE: {error}"))?;
                parameters = parameters.add_root_certificate(root);
            }
            let parameters = parameters
                .build_rustls()
                .map_err(|error| format!("QUOTAWATCH_SMTP_URL: TLS cannot be set up: {error}"))?;
            Ok(wrap(parameters))
        };
        let tls = match server.security {
            Security::ImplicitTls => tls(Tls::Wrapper)?,
            Security::StartTls => tls(Tls::Required)?,
            Security::Plain => Tls::None,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&server.host)
            .port(server.port)
            .tls(tls)
            .timeout(Some(config.timeout));
        if let Some((user, password)) = &server.credentials {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        Ok(Self {
            transport: builder.build(),
            from: config.from.clone(),
            timeout: config.timeout,
        })
    }

    /// The longest one delivery may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Delivers `email` to `to` (one to [`MAX_RECIPIENTS`] addresses), within
    /// the configured timeout.
    pub async fn send(&self, to: &[Address], email: &Email) -> Result<(), MailError> {
        if to.is_empty() || to.len() > MAX_RECIPIENTS {
            return Err(MailError::Permanent(format!(
                "between 1 and {MAX_RECIPIENTS} recipients are needed, not {}",
                to.len()
            )));
        }
        let mut message = Message::builder()
            .from(self.from.clone())
            .subject(email.subject.clone());
        for address in to {
            message = message.to(Mailbox::new(None, address.clone()));
        }
        let message = message
            .multipart(MultiPart::alternative_plain_html(
                email.text.clone(),
                email.html.clone(),
            ))
            .map_err(|error| {
                MailError::Permanent(format!("the message cannot be built: {error}"))
            })?;
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Err(_) => Err(MailError::Transient(format!(
                "the SMTP server did not finish within {}",
                humanize_duration(self.timeout)
            ))),
            Ok(Err(error)) => Err(classify(&error)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// Whether trying again later can help with `error`. A reply says so by
/// its class (4xx or 5xx); a failure to connect or a timeout is transient;
/// what lettre calls a client error (no authentication mechanism in
/// common, a malformed address), a TLS failure, and a certificate that is
/// not trusted or a server that speaks no TLS this client accepts (which
/// lettre reports as a connection error) stay until the settings change.
fn classify(error: &lettre::transport::smtp::Error) -> MailError {
    let reason = error.to_string();
    if error.is_permanent() || error.is_client() || error.is_tls() || refused_by_tls(error) {
        MailError::Permanent(reason)
    } else {
        MailError::Transient(reason)
    }
}

/// Whether `error` comes from rustls refusing the server's certificate or
/// finding nothing in common with it, however deep in I/O errors it lies.
fn refused_by_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::PeerIncompatible(_)
            );
        }
        cause = error.source();
    }
    false
}

// ----- composition ------------------------------------------------------------------------

/// An email ready to send: its subject, and the same content as plain text
/// and as HTML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// What an alert email reports.
#[derive(Clone, Copy, Debug)]
pub struct Alert<'a> {
    pub notification: &'a Notification,
    /// The workspace's name as people know it (the notification names its id).
    pub workspace_name: &'a str,
    pub phase: Phase,
    /// How the notification's limit stands now, with its forecast, when it
    /// has a limit and the caller knows it; a threshold crossing without it
    /// shows the numbers of the crossing.
    pub limit: Option<LimitFacts>,
    /// The dashboard's address (quotawatch's public URL), to link to the
    /// workspace's page.
    pub dashboard: Option<&'a reqwest::Url>,
}

/// One labelled line of an alert's figures ("Used", "12,000 of 15,000 tokens (80%)").
type Figure = (&'static str, String);

/// The email of `alert` as of `now`.
pub fn compose(alert: &Alert<'_>, now: Timestamp) -> Email {
    let notification = alert.notification;
    let heading = match alert.phase {
        Phase::Raised => notification.title.clone(),
        Phase::Resolved => format!("Resolved: {}", notification.title),
    };
    let mut figures: Vec<Figure> = Vec::new();
    figures.push(("Status", status_line(alert)));
    if let Some(workspace) = &notification.workspace {
        figures.push((
            "Workspace",
            format!("{} ({})", alert.workspace_name, workspace.as_str()),
        ));
    }
    if let Some(kind) = notification.limit {
        figures.push(("Limit", kind.to_string()));
        if let Some(numbers) = numbers_of(alert) {
            figures.push(("Used", usage_line(kind, numbers.used, numbers.max)));
            if let Some(at) = numbers.resets_at {
                figures.push(("Resets", in_time(at, now)));
            }
        }
        if let Some(forecast) = alert
            .limit
            .and_then(|limit| forecast_line(kind, &limit, now))
        {
            figures.push(("Forecast", forecast));
        }
    }
    let link = dashboard_link(alert.dashboard, notification);
    layout(
        subject(alert),
        &heading,
        &notification.message,
        &figures,
        ("Suggested actions", &notification.suggested_actions),
        link.as_deref(),
    )
}

/// The one email that carries several alerts at once (a digest, sent when
/// more come within a minute than a channel is sent one by one): the count
/// in the subject and a line per alert, each as its own email's subject
/// says it. `tests` is how many test alerts it carries beside them.
pub fn compose_digest(
    alerts: &[Alert<'_>],
    tests: usize,
    dashboard: Option<&reqwest::Url>,
    now: Timestamp,
) -> Email {
    let count = alerts.len() + tests;
    let mut lines: Vec<String> = alerts
        .iter()
        .map(|alert| {
            format!(
                "{} ({}, {})",
                summary(alert),
                alert.notification.severity.name(),
                alert.phase.name()
            )
        })
        .collect();
    lines.extend(std::iter::repeat_n("test alert".to_owned(), tests));
    layout(
        cut(format!("[quotawatch] {count} alerts")),
        &format!("{count} alerts from quotawatch"),
        &format!(
            "These alerts came at once (as of {now}), so they are sent in one message. The dashboard has each one's figures and suggested actions."
        ),
        &[("Alerts", count.to_string())],
        ("Alerts", &lines),
        dashboard.map(reqwest::Url::as_str),
    )
}

/// The email `POST /api/alerts/test` sends: proof that mail from quotawatch
/// reaches its recipients, for `workspace_name` (or the whole service).
pub fn compose_test(
    workspace_name: Option<&str>,
    dashboard: Option<&reqwest::Url>,
    now: Timestamp,
) -> Email {
    let scope = workspace_name.map_or_else(
        || "this quotawatch service".to_owned(),
        |name| format!("workspace {name}"),
    );
    let subject = match workspace_name {
        Some(name) => format!("[quotawatch] {}: test alert", one_line(name)),
        None => "[quotawatch] test alert".to_owned(),
    };
    layout(
        cut(subject),
        "A test alert from quotawatch",
        &format!(
            "This message was sent at {now} to check that email alerts for {scope} reach you. Nothing needs to be done."
        ),
        &[("Status", "test".to_owned())],
        (
            "Suggested actions",
            &["If this reached the wrong people, change the channel's recipients.".to_owned()],
        ),
        dashboard.map(reqwest::Url::as_str),
    )
}

/// The subject: short and specific, such as
/// "[quotawatch] acme: 80% of tokens_per_day used".
fn subject(alert: &Alert<'_>) -> String {
    cut(format!("[quotawatch] {}", summary(alert)))
}

/// What the alert is about in one line, such as
/// "acme: 80% of tokens_per_day used".
fn summary(alert: &Alert<'_>) -> String {
    let notification = alert.notification;
    let what = match (notification.limit, numbers_of(alert)) {
        (Some(kind), numbers) => match (notification.kind, notification.crossing) {
            // A crossing is named by its threshold, whatever the usage
            // had reached by the time it was seen.
            (NotificationKind::ThresholdCrossed, Some(crossing)) => {
                format!("{}% of {kind} used", crossing.percent)
            }
            (
                NotificationKind::ThresholdCrossed
                | NotificationKind::ApproachingLimit
                | NotificationKind::BudgetApproaching,
                _,
            ) => numbers.map_or_else(
                || format!("nearing the {kind} limit"),
                |numbers| format!("{}% of {kind} used", percent(numbers.used, numbers.max)),
            ),
            (NotificationKind::ForecastExhaustion, _) => format!("{kind} forecast to run out"),
            _ => format!("{kind} used up"),
        },
        (None, _) => notification.title.clone(),
    };
    let what = match alert.phase {
        Phase::Raised => what,
        Phase::Resolved => format!("resolved: {what}"),
    };
    match notification.workspace {
        Some(_) => format!("{}: {what}", one_line(alert.workspace_name)),
        None => what,
    }
}

/// A subject cut to [`MAX_SUBJECT_CHARS`], with an ellipsis.
fn cut(subject: String) -> String {
    if subject.chars().count() <= MAX_SUBJECT_CHARS {
        return subject;
    }
    let mut cut: String = subject.chars().take(MAX_SUBJECT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// `text` with every control character (a line break most of all, which
/// would end a header) replaced by a space.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What the alert says of the notification's state.
fn status_line(alert: &Alert<'_>) -> String {
    let notification = alert.notification;
    let severity = notification.severity.name();
    match (alert.phase, notification.resolved_at) {
        (Phase::Raised, _) => format!(
            "raised at {} ({severity}, {})",
            notification.created_at,
            notification.kind.name()
        ),
        (Phase::Resolved, Some(at)) => format!(
            "resolved at {at}, raised at {} ({severity}, {})",
            notification.created_at,
            notification.kind.name()
        ),
        (Phase::Resolved, None) => format!(
            "resolved, raised at {} ({severity}, {})",
            notification.created_at,
            notification.kind.name()
        ),
    }
}

/// The numbers an alert shows: the limit's as it stands, or those of the
/// crossing the notification reports.
fn numbers_of(alert: &Alert<'_>) -> Option<LimitFacts> {
    alert.limit.or_else(|| {
        alert.notification.crossing.map(|crossing| LimitFacts {
            max: crossing.max,
            used: crossing.used,
            resets_at: Some(crossing.period_end),
            ..LimitFacts::default()
        })
    })
}

/// The share of `max` that `used` is, in whole percent, rounded down (so
/// that 79.9% does not read as a crossed 80%).
fn percent(used: u64, max: u64) -> u64 {
    if max == 0 {
        return 100;
    }
    u64::try_from(u128::from(used) * 100 / u128::from(max)).unwrap_or(u64::MAX)
}

/// "12,000 of 15,000 tokens (80%)".
fn usage_line(kind: LimitKind, used: u64, max: u64) -> String {
    format!(
        "{} of {}{} ({}%)",
        kind.metric.figure(used),
        kind.metric.figure(max),
        kind.metric.unit_suffix(),
        percent(used, max)
    )
}

/// When the limit runs out at the recent pace, if it does before it resets.
fn forecast_line(kind: LimitKind, limit: &LimitFacts, now: Timestamp) -> Option<String> {
    let forecast = limit.forecast?;
    if forecast.basis == Basis::UsedUp {
        return Some(format!(
            "{kind} is used up{}.",
            limit
                .resets_at
                .map(|at| format!("; it resets {}", in_time(at, now)))
                .unwrap_or_default()
        ));
    }
    let runs_out = forecast.exhausts_at?;
    let before_reset = limit.resets_at.map_or_else(String::new, |reset| {
        format!(
            ", {} before it resets",
            humanize_duration(runs_out.until(reset))
        )
    });
    Some(format!(
        "At this pace ({}{} an hour) {kind} runs out {}{before_reset}.",
        kind.metric
            .figure(forecast.rate_per_hour.max(0.0).round() as u64),
        kind.metric.unit_suffix(),
        in_time(runs_out, now)
    ))
}

/// The dashboard's page of the notification's workspace (its overview for a
/// service-wide notification).
fn dashboard_link(dashboard: Option<&reqwest::Url>, notification: &Notification) -> Option<String> {
    dashboard.map(|base| dashboard_page(base, notification.workspace.as_ref()))
}

/// The dashboard's page of `workspace` under `base` (its overview for none),
/// the one link every alert (email, webhook, Slack) carries.
pub fn dashboard_page(base: &reqwest::Url, workspace: Option<&WorkspaceId>) -> String {
    match workspace {
        Some(workspace) => {
            let mut page = base.clone();
            let id: String = percent_encoding::utf8_percent_encode(
                workspace.as_str(),
                percent_encoding::NON_ALPHANUMERIC,
            )
            .collect();
            page.set_fragment(Some(&format!("/w/{id}")));
            page.to_string()
        }
        None => base.to_string(),
    }
}

/// The email laid out from its parts, once as text and once as HTML: a
/// heading, a message, figures, a titled list (left out when empty) and a
/// link.
fn layout(
    subject: String,
    heading: &str,
    message: &str,
    figures: &[Figure],
    (list_title, list): (&str, &[String]),
    link: Option<&str>,
) -> Email {
    let mut text = format!("{heading}\n\n{message}\n\n");
    for (label, value) in figures {
        let _ = writeln!(text, "{label}: {value}");
    }
    if !list.is_empty() {
        let _ = writeln!(text, "\n{list_title}:");
        for item in list {
            let _ = writeln!(text, "- {item}");
        }
    }
    if let Some(link) = link {
        let _ = write!(text, "\nDashboard: {link}\n");
    }
    text.push_str("\n-- \nSent by quotawatch.\n");

    let mut html = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head>\n<body style=\"font-family: sans-serif; line-height: 1.4\">\n",
    );
    let _ = writeln!(html, "<h2>{}</h2>", escape_html(heading));
    let _ = writeln!(html, "<p>{}</p>", escape_html(message));
    html.push_str("<table style=\"border-collapse: collapse\">\n");
    for (label, value) in figures {
        let _ = writeln!(
            html,
            "<tr><th style=\"text-align: left; padding-right: 1em\">{}</th><td>{}</td></tr>",
            escape_html(label),
            escape_html(value)
        );
    }
    html.push_str("</table>\n");
    if !list.is_empty() {
        let _ = writeln!(html, "<h3>{}</h3>\n<ul>", escape_html(list_title));
        for item in list {
            let _ = writeln!(html, "<li>{}</li>", escape_html(item));
        }
        html.push_str("</ul>\n");
    }
    if let Some(link) = link {
        let link = escape_html(link);
        let _ = writeln!(
            html,
            "<p><a href=\"{link}\">Open the dashboard</a> ({link})</p>"
        );
    }
    html.push_str("<p style=\"color: #666\">Sent by quotawatch.</p>\n</body></html>\n");
    Email {
        subject,
        text,
        html,
    }
}

/// `text` as HTML text or as an attribute's value in double or single
/// quotes: the five characters that could end or start markup are written
/// as entities.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::forecast::Forecast;
    use crate::domain::limits::{Limits, TOKENS_PER_DAY, WorkspaceConfig};
    use crate::domain::notification::{Crossing, describe_threshold};

    const HOUR: i64 = 3_600_000;
    const NOW: Timestamp = Timestamp::from_millis(1_764_000_000_000);

    fn server(text: &str) -> SmtpServer {
        SmtpServer::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn refused(text: &str) -> String {
        match SmtpServer::parse(text) {
            Ok(server) => panic!("{text} should be refused, read as {server:?}"),
            Err(message) => message,
        }
    }

    #[test]
    fn each_scheme_chooses_its_security_and_default_port() {
        let implicit = server("smtps://alerts:s3cret@mail.example.com");
        assert_eq!(implicit.security, Security::ImplicitTls);
        assert_eq!(implicit.port, 465);
        assert_eq!(implicit.host, "mail.example.com");
        let (user, password) = implicit.credentials.expect("credentials");
        assert_eq!((user.as_str(), password.expose()), ("alerts", "s3cret"));

        let starttls = server("smtp://alerts:s3cret@mail.example.com?tls=required");
        assert_eq!(starttls.security, Security::StartTls);
        assert_eq!(starttls.port, 587);
        // STARTTLS is required unless the URL says otherwise.
        assert_eq!(
            server("smtp://mail.example.com:2525").security,
            Security::StartTls
        );
        assert_eq!(server("smtp://mail.example.com:2525").port, 2525);

        let plain = server("smtp://relay.internal?tls=none");
        assert_eq!(plain.security, Security::Plain);
        assert_eq!(plain.port, 25);
        assert!(plain.credentials.is_none());
        assert_eq!(server("smtps://[::1]:1465").host, "::1");
    }

    #[test]
    fn a_password_is_percent_decoded() {
        let server = server("smtps://ops%40example.com:p%40ss%3Aw0rd@mail.example.com");
        let (user, password) = server.credentials.expect("credentials");
        assert_eq!(user, "ops@example.com");
        assert_eq!(password.expose(), "p@ss:w0rd");
    }

    #[test]
    fn unusable_urls_are_refused_with_the_password_masked() {
        for (url, words) in [
            ("http://mail.example.com", "scheme"),
            ("mail.example.com:25", "scheme"),
            (
                "smtp://user:hunter2@mail.example.com?tls=none",
                "unencrypted",
            ),
            ("smtps://mail.example.com?tls=none", "without TLS"),
            (
                "smtp://mail.example.com?tls=maybe",
                "neither required nor none",
            ),
            ("smtp://mail.example.com?tls=none&tls=required", "twice"),
            ("smtp://mail.example.com?timeout=5", "the only one"),
            ("smtp://mail.example.com/inbox", "path"),
            ("smtp://user@mail.example.com", "without a password"),
            ("smtp://", "host"),
            ("not a url", "not a URL"),
        ] {
            let message = refused(url);
            assert!(message.contains(words), "{url}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn the_sender_is_an_address_with_an_optional_name() {
        let sender = parse_sender("quotawatch <alerts@example.com>").expect("valid");
        assert_eq!(sender.email.to_string(), "alerts@example.com");
        assert_eq!(sender.name.as_deref(), Some("quotawatch"));
        assert!(parse_sender("alerts@example.com").is_ok());
        for wrong in [
            "alerts",
            "alerts@",
            "<alerts@example.com",
            "a b@example.com",
        ] {
            assert!(parse_sender(wrong).is_err(), "{wrong}");
        }
    }

    #[test]
    fn an_extra_root_must_be_a_pem_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").expect("write");
        let message = read_extra_root(path.to_str().expect("utf-8")).expect_err("refused");
        assert!(message.contains("no PEM certificate"), "{message}");
        let missing = dir.path().join("missing.pem");
        let message = read_extra_root(missing.to_str().expect("utf-8")).expect_err("refused");
        assert!(message.contains("cannot read"), "{message}");
    }

    #[test]
    fn recipients_are_bounded_checked_and_named_by_position() {
        let addresses =
            parse_recipients(&["ops@example.com", "Oncall@Example.com"]).expect("valid");
        assert_eq!(addresses.len(), 2);
        let error = parse_recipients(&["ops@example.com", "not-an-address"]).expect_err("refused");
        assert_eq!(error.index, Some(1));
        assert!(error.message.contains("not-an-address"), "{error}");
        let error = parse_recipients(&["ops@example.com", "ops@example.com"]).expect_err("refused");
        assert_eq!(error.index, Some(1));
        assert!(error.message.contains("twice"), "{error}");
        let long = format!("{}@example.com", "a".repeat(MAX_ADDRESS_LEN));
        assert_eq!(
            parse_recipients(&[long]).expect_err("refused").index,
            Some(0)
        );
        let none: [&str; 0] = [];
        assert_eq!(parse_recipients(&none).expect_err("refused").index, None);
        let many: Vec<String> = (0..=MAX_RECIPIENTS)
            .map(|n| format!("ops{n}@example.com"))
            .collect();
        assert_eq!(parse_recipients(&many).expect_err("refused").index, None);
        assert!(parse_recipients(&many[..MAX_RECIPIENTS]).is_ok());
    }

    #[test]
    fn html_escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape_html(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape_html("plain 80% text"), "plain 80% text");
        assert_eq!(escape_html("&amp;"), "&amp;amp;");
    }

    /// A crossing of 80% of a day's 100,000 tokens in workspace `acme`.
    fn crossing() -> Notification {
        let id = "acme".parse().expect("id");
        let workspace = WorkspaceConfig::new(id, Limits::default());
        describe_threshold(
            &workspace,
            TOKENS_PER_DAY,
            Crossing {
                percent: 80,
                used: 80_500,
                max: 100_000,
                period_start: Timestamp::from_millis(NOW.millis() - 10 * HOUR),
                period_end: Timestamp::from_millis(NOW.millis() + 14 * HOUR),
            },
            NOW,
        )
    }

    fn alert<'a>(notification: &'a Notification, name: &'a str) -> Alert<'a> {
        Alert {
            notification,
            workspace_name: name,
            phase: Phase::Raised,
            limit: None,
            dashboard: None,
        }
    }

    #[test]
    fn a_crossing_shows_its_numbers_and_actions_in_both_parts() {
        let notification = crossing();
        let email = compose(&alert(&notification, "Acme Corp"), NOW);
        assert_eq!(
            email.subject,
            "[quotawatch] Acme Corp: 80% of tokens_per_day used"
        );
        for part in [&email.text, &email.html] {
            assert!(part.contains("80,500 of 100,000 tokens (80%)"), "{part}");
            assert!(part.contains("in 14h 0m"), "{part}");
            assert!(part.contains("Acme Corp (acme)"), "{part}");
            assert!(part.contains(&escape_html(&notification.message)), "{part}");
            for action in &notification.suggested_actions {
                assert!(part.contains(&escape_html(action)), "{part}");
            }
        }
        assert!(
            email
                .text
                .contains(&format!("- {}", notification.suggested_actions[0]))
        );
        assert!(email.html.contains("<li>"));
    }

    #[test]
    fn the_html_part_shows_a_hostile_name_as_text() {
        let notification = crossing();
        let name = "<script>alert(1)</script>\r\nBcc: x@example.com";
        let email = compose(&alert(&notification, name), NOW);
        assert!(!email.html.contains("<script>"), "{}", email.html);
        assert!(email.html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(email.text.contains("<script>alert(1)</script>"));
        assert!(!email.subject.contains('\n') && !email.subject.contains('\r'));
    }

    #[test]
    fn the_forecast_and_the_dashboard_link_are_shown_when_known() {
        let mut notification = crossing();
        notification.workspace = Some("acme".parse().expect("id"));
        let resets_at = Timestamp::from_millis(NOW.millis() + 5 * HOUR);
        let limit = LimitFacts {
            max: 100_000,
            used: 90_000,
            resets_at: Some(resets_at),
            frees_at: None,
            forecast: Some(Forecast {
                exhausts_at: Some(Timestamp::from_millis(NOW.millis() + 2 * HOUR)),
                rate_per_hour: 5_000.0,
                basis: Basis::Smoothed,
                runs_out_at: Some(Timestamp::from_millis(NOW.millis() + 2 * HOUR)),
            }),
        };
        let dashboard: reqwest::Url = "https://quota.example.com/".parse().expect("url");
        let email = compose(
            &Alert {
                limit: Some(limit),
                dashboard: Some(&dashboard),
                ..alert(&notification, "acme")
            },
            NOW,
        );
        // The subject names the threshold crossed, not the usage since.
        assert_eq!(
            email.subject,
            "[quotawatch] acme: 80% of tokens_per_day used"
        );
        assert!(email.text.contains("90,000 of 100,000 tokens (90%)"));
        let forecast = "At this pace (5,000 tokens an hour) tokens_per_day runs out in 2h 0m";
        for part in [&email.text, &email.html] {
            assert!(part.contains(forecast), "{part}");
            assert!(part.contains("3h 0m before it resets"), "{part}");
            assert!(
                part.contains("https://quota.example.com/#/w/acme"),
                "{part}"
            );
        }

        let used_up = LimitFacts {
            used: 100_000,
            forecast: Some(Forecast {
                basis: Basis::UsedUp,
                ..limit.forecast.expect("forecast")
            }),
            ..limit
        };
        let email = compose(
            &Alert {
                limit: Some(used_up),
                ..alert(&notification, "acme")
            },
            NOW,
        );
        assert!(
            email
                .text
                .contains("tokens_per_day is used up; it resets in 5h 0m")
        );
        assert!(!email.text.contains("At this pace"));
    }

    #[test]
    fn a_resolved_alert_says_so_in_its_subject_and_heading() {
        let mut notification = crossing();
        notification.resolved_at = Some(Timestamp::from_millis(NOW.millis() + HOUR));
        let email = compose(
            &Alert {
                phase: Phase::Resolved,
                ..alert(&notification, "acme")
            },
            NOW,
        );
        assert_eq!(
            email.subject,
            "[quotawatch] acme: resolved: 80% of tokens_per_day used"
        );
        assert!(
            email
                .text
                .starts_with("Resolved: Workspace acme crossed 80%")
        );
        assert!(email.text.contains("Status: resolved at "));
    }

    #[test]
    fn a_long_subject_is_cut() {
        let notification = crossing();
        let name = "n".repeat(300);
        let email = compose(&alert(&notification, &name), NOW);
        assert_eq!(email.subject.chars().count(), MAX_SUBJECT_CHARS);
        assert!(email.subject.ends_with('…'));
    }

    #[test]
    fn the_test_email_names_what_it_tests() {
        let email = compose_test(Some("acme <3"), None, NOW);
        assert_eq!(email.subject, "[quotawatch] acme <3: test alert");
        assert!(
            email
                .text
                .contains("email alerts for workspace acme <3 reach you")
        );
        assert!(email.html.contains("workspace acme &lt;3 reach you"));
        assert_eq!(
            compose_test(None, None, NOW).subject,
            "[quotawatch] test alert"
        );
    }
}
