//! Reading usage out of response bodies while they pass through.
//!
//! A JSON body is kept whole up to [`WHOLE_BODY_LIMIT`] and parsed at its
//! end; a larger one (a big embeddings batch) keeps only its tail, where
//! OpenAI puts `usage`. A server-sent-event stream is read line by line:
//! chat streams carry usage in a final chunk with `"usage":{...}`, Responses
//! streams in the terminal `response.completed`/`incomplete`/`failed` event.
//!
//! When quotawatch itself asked a chat stream for usage (the client did not),
//! the scanner also removes what that added — the final usage chunk and the
//! `"usage":null` field of every other chunk — so that the client receives
//! exactly the stream it asked for. Chunks pass through untouched otherwise.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;
use serde_json::Value;

use super::estimate::Endpoint;
use crate::openai::{ErrorEnvelope, ErrorObject, Usage};

/// JSON bodies up to this size are kept whole for parsing.
const WHOLE_BODY_LIMIT: usize = 1 << 20;
/// How much of a larger body's end is kept to find `usage` in.
const TAIL: usize = 64 << 10;
/// The largest event (or line) of a stream held while it arrives. OpenAI's
/// largest, the Responses API's final event with the whole output in it,
/// stays far below; a stream that goes past it is treated as broken, so
/// that no upstream can make quotawatch hold an unbounded event.
pub const MAX_EVENT_BYTES: usize = 4 << 20;
/// The key whose object the scanner reads, and removes where it added it.
const USAGE_KEY: &[u8] = b"\"usage\"";

/// A stream's event outgrew [`MAX_EVENT_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event of the upstream's stream is longer than {MAX_EVENT_BYTES} bytes")]
pub struct EventTooLong;

/// What a body said about the call.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Findings {
    pub usage: Option<Usage>,
    /// An error event inside a stream.
    pub error: Option<ErrorObject>,
    /// Bytes of generated text seen so far, for a stream cut short.
    pub output_bytes: u64,
    /// The tier the answer says the call was served at (`service_tier`),
    /// which may differ from the one asked for.
    pub service_tier: Option<String>,
}

pub enum Scanner {
    Json(JsonScanner),
    Sse(Box<SseScanner>),
}

impl Scanner {
    /// The scanner for a body of `content_type`.
    pub fn new(endpoint: Endpoint, content_type: &str, strip_injected_usage: bool) -> Self {
        if content_type.starts_with("text/event-stream") {
            Scanner::Sse(Box::new(SseScanner::new(endpoint, strip_injected_usage)))
        } else {
            Scanner::Json(JsonScanner::default())
        }
    }

    /// Whether the body is an event stream, whose text arrives piece by piece.
    pub fn is_stream(&self) -> bool {
        matches!(self, Scanner::Sse(_))
    }

    /// Takes in the next chunk and returns what to pass on.
    pub fn feed(&mut self, chunk: Bytes) -> Result<Bytes, EventTooLong> {
        match self {
            Scanner::Json(json) => {
                json.feed(&chunk);
                Ok(chunk)
            }
            Scanner::Sse(sse) => sse.feed(chunk),
        }
    }

    /// The end of the body: returns anything still held back, and what was
    /// found.
    pub fn finish(&mut self) -> (Bytes, Findings) {
        match self {
            Scanner::Json(json) => (Bytes::new(), json.findings()),
            Scanner::Sse(sse) => (sse.flush(), sse.findings.clone()),
        }
    }
}

#[derive(Default)]
pub struct JsonScanner {
    head: BytesMut,
    /// Set once the body outgrew the head; from then on only the tail is kept.
    tail: Option<BytesMut>,
}

impl JsonScanner {
    fn feed(&mut self, chunk: &[u8]) {
        match &mut self.tail {
            None if self.head.len() + chunk.len() <= WHOLE_BODY_LIMIT => {
                self.head.extend_from_slice(chunk);
            }
            None => {
                let mut tail = std::mem::take(&mut self.head);
                tail.extend_from_slice(chunk);
                self.tail = Some(keep_end(tail));
            }
            Some(tail) => {
                tail.extend_from_slice(chunk);
                if tail.len() > 2 * TAIL {
                    *tail = keep_end(std::mem::take(tail));
                }
            }
        }
    }

    fn findings(&self) -> Findings {
        #[derive(Deserialize)]
        struct WithUsage {
            usage: Option<Usage>,
            service_tier: Option<String>,
        }
        match &self.tail {
            None => serde_json::from_slice::<WithUsage>(&self.head)
                .map(|body| Findings {
                    usage: body.usage,
                    service_tier: body.service_tier,
                    ..Findings::default()
                })
                .unwrap_or_default(),
            // A body this large is a batch of embeddings, which has no tier.
            Some(tail) => Findings {
                usage: usage_in_tail(tail),
                ..Findings::default()
            },
        }
    }
}

fn keep_end(mut buffer: BytesMut) -> BytesMut {
    if buffer.len() > TAIL {
        let _ = buffer.split_to(buffer.len() - TAIL);
    }
    buffer
}

/// Finds the last `"usage": {...}` object in a piece of JSON.
fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    let at = memmem::rfind(tail, USAGE_KEY)?;
    let rest = &tail[at + USAGE_KEY.len()..];
    let start = rest.iter().position(|b| *b == b'{')?;
    let between = &rest[..start];
    if !between
        .iter()
        .all(|b| b.is_ascii_whitespace() || *b == b':')
    {
        return None;
    }
    serde_json::Deserializer::from_slice(&rest[start..])
        .into_iter::<Usage>()
        .next()?
        .ok()
}

pub struct SseScanner {
    endpoint: Endpoint,
    strip: bool,
    /// An incomplete line (or, when stripping, an incomplete event).
    pending: BytesMut,
    /// How far `pending` was searched for line ends: however the stream is
    /// cut, no byte is searched twice while its line or event arrives.
    searched: usize,
    /// Where the incomplete line of an incomplete event starts in `pending`.
    line_start: usize,
    findings: Findings,
}

/// The parts of a chat chunk the scanner needs: the generated text, for
/// counting what a cut-short stream produced, and the usage.
#[derive(Deserialize)]
struct ChatChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChatChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default, borrow)]
    service_tier: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct ChatChoice<'a> {
    #[serde(borrow)]
    delta: Option<ChatDelta<'a>>,
}

#[derive(Deserialize)]
struct ChatDelta<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
}

/// A string read in place where it has no escapes, and copied only where
/// it has. serde borrows only a `Cow` field itself, not one inside an
/// `Option`, hence this wrapper.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// What stripping does with one line of an event.
enum LineFate {
    Keep,
    /// Replace the line's data with this JSON.
    Rewrite(Vec<u8>),
    /// The line is the usage chunk quotawatch asked for: its whole event goes.
    DropEvent,
}

impl SseScanner {
    fn new(endpoint: Endpoint, strip: bool) -> Self {
        Self {
            endpoint,
            strip,
            pending: BytesMut::new(),
            searched: 0,
            line_start: 0,
            findings: Findings::default(),
        }
    }

    fn feed(&mut self, chunk: Bytes) -> Result<Bytes, EventTooLong> {
        self.pending.extend_from_slice(&chunk);
        let out = if self.strip {
            // Stripping may drop a whole event, so output waits for complete
            // ones. It only takes away, so what is pending is room enough.
            let mut out = BytesMut::with_capacity(self.pending.len());
            while let Some(event) =
                take_event(&mut self.pending, &mut self.line_start, &mut self.searched)
            {
                self.pass_event(&event, &mut out);
            }
            out.freeze()
        } else {
            // Lines are only read; the chunk goes on as it came.
            while let Some(line) = take_line(&mut self.pending, &mut self.searched) {
                self.read_line(&line);
            }
            chunk
        };
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(EventTooLong);
        }
        Ok(out)
    }

    /// Everything still held back at the end of the stream.
    fn flush(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        self.searched = 0;
        self.line_start = 0;
        let mut out = BytesMut::new();
        // An unterminated last line still counts (both calls do nothing
        // with an empty rest).
        if self.strip {
            self.pass_event(&rest, &mut out);
        } else {
            self.read_line(&rest);
        }
        out.freeze()
    }

    /// Reads one event and writes it to `out` without what quotawatch added.
    fn pass_event(&mut self, event: &[u8], out: &mut BytesMut) {
        let start = out.len();
        for line in lines(event) {
            match self.read_line(line) {
                LineFate::Keep => out.extend_from_slice(line),
                LineFate::Rewrite(data) => {
                    let ending = if line.ends_with(b"\r\n") {
                        "\r\n"
                    } else {
                        "\n"
                    };
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&data);
                    out.extend_from_slice(ending.as_bytes());
                }
                LineFate::DropEvent => {
                    out.truncate(start);
                    return;
                }
            }
        }
    }

    /// Reads one line, noting usage, errors and generated text.
    fn read_line(&mut self, line: &[u8]) -> LineFate {
        let Some(data) = line.strip_prefix(b"data:") else {
            return LineFate::Keep;
        };
        let data = data.trim_ascii();
        if !data.starts_with(b"{") {
            return LineFate::Keep;
        }
        if data.starts_with(b"{\"error\"") {
            self.findings.error = ErrorEnvelope::parse(data);
            return LineFate::Keep;
        }
        if self.endpoint == Endpoint::Responses {
            self.read_responses_event(data);
            return LineFate::Keep;
        }
        self.read_chat_chunk(data)
    }

    fn read_chat_chunk(&mut self, data: &[u8]) -> LineFate {
        let Ok(chunk) = serde_json::from_slice::<ChatChunk>(data) else {
            return LineFate::Keep;
        };
        let text: usize = chunk
            .choices
            .iter()
            .filter_map(|choice| Some(choice.delta.as_ref()?.content.as_ref()?.0.len()))
            .sum();
        self.findings.output_bytes += text as u64;
        // Every chunk names the tier, usually the same one.
        if let Some(Text(tier)) = chunk.service_tier
            && self.findings.service_tier.as_deref() != Some(&*tier)
        {
            self.findings.service_tier = Some(tier.into_owned());
        }
        let had_usage = chunk.usage.is_some();
        if let Some(usage) = chunk.usage {
            self.findings.usage = Some(usage);
        }
        if !self.strip {
            LineFate::Keep
        } else if had_usage && chunk.choices.is_empty() {
            LineFate::DropEvent
        } else {
            // Every other chunk carries `"usage":null` (or, from some
            // servers, usage next to the last choices): the field goes.
            without_usage_field(data).map_or(LineFate::Keep, LineFate::Rewrite)
        }
    }

    fn read_responses_event(&mut self, data: &[u8]) {
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        match event.get("type").and_then(Value::as_str) {
            Some("response.output_text.delta") => {
                let delta = event.get("delta").and_then(Value::as_str).unwrap_or("");
                self.findings.output_bytes += delta.len() as u64;
            }
            Some("response.completed" | "response.incomplete" | "response.failed") => {
                if let Some(usage) = event
                    .pointer("/response/usage")
                    .and_then(|usage| serde_json::from_value(usage.clone()).ok())
                {
                    self.findings.usage = Some(usage);
                }
                if let Some(tier) = event
                    .pointer("/response/service_tier")
                    .and_then(Value::as_str)
                {
                    self.findings.service_tier = Some(tier.to_owned());
                }
            }
            Some("error") => {
                self.findings.error = serde_json::from_value(event.clone()).ok();
            }
            _ => {}
        }
    }
}

/// A chat chunk without its top-level `usage` field, or `None` when it has
/// none. An unescaped `"usage"` cannot occur inside a JSON string, so a
/// byte search finds the key; OpenAI's compact `,"usage":null` is cut out
/// directly, and any other spelling goes through a re-serialisation that
/// keeps the order of the other fields.
fn without_usage_field(data: &[u8]) -> Option<Vec<u8>> {
    // Searchers are built once: building one for each search (as
    // `memmem::find` does) cost more than the searches, three times in
    // every chunk of a stream.
    static KEY: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(USAGE_KEY));
    static COMPACT: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b",\"usage\":null"));
    KEY.find(data)?;
    let compact = remove_all(data, &COMPACT);
    if KEY.find(&compact).is_none() {
        return Some(compact);
    }
    let mut chunk: Value = serde_json::from_slice(data).ok()?;
    chunk.as_object_mut()?.shift_remove("usage")?;
    serde_json::to_vec(&chunk).ok()
}

/// `text` without any occurrence of what `needle` finds.
fn remove_all(text: &[u8], needle: &memmem::Finder) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut kept = 0;
    for at in needle.find_iter(text) {
        out.extend_from_slice(&text[kept..at]);
        kept = at + needle.needle().len();
    }
    out.extend_from_slice(&text[kept..]);
    out
}

/// The lines of `text`, each with its `\n` (a last one without `\n` as it
/// is), as `split_inclusive` gives them. Line ends are found with memchr,
/// many bytes at a time: a stream's every byte passes here, and the search
/// byte by byte cost a twentieth of a proxied stream's instructions.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some(line)
    })
}

/// Takes one complete line (with its `\n`) off the front of `buffer`,
/// searching from `searched` on, and leaving there how far it searched.
fn take_line(buffer: &mut BytesMut, searched: &mut usize) -> Option<BytesMut> {
    match memchr::memchr(b'\n', &buffer[*searched..]) {
        Some(offset) => {
            let end = *searched + offset;
            *searched = 0;
            Some(buffer.split_to(end + 1))
        }
        None => {
            *searched = buffer.len();
            None
        }
    }
}

/// Takes one complete event (its lines and the blank line ending it) off
/// the front of `buffer`. Lines may end in `\r\n`. `searched` is how far
/// the buffer was searched for line ends already, `line_start` where the
/// last incomplete line starts: the search goes on there.
fn take_event(
    buffer: &mut BytesMut,
    line_start: &mut usize,
    searched: &mut usize,
) -> Option<BytesMut> {
    while let Some(offset) = memchr::memchr(b'\n', &buffer[*searched..]) {
        let line_end = *searched + offset + 1;
        let blank = matches!(&buffer[*line_start..line_end], b"\n" | b"\r\n");
        *line_start = line_end;
        *searched = line_end;
        if blank {
            *line_start = 0;
            *searched = 0;
            return Some(buffer.split_to(line_end));
        }
    }
    *searched = buffer.len();
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::domain::openai_fixture as fixture;

    /// Feeds `body` in chunks of `size` bytes and collects the output.
    fn run(scanner: &mut Scanner, body: &[u8], size: usize) -> (Vec<u8>, Findings) {
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            out.extend_from_slice(
                &scanner
                    .feed(Bytes::copy_from_slice(chunk))
                    .expect("bounded"),
            );
        }
        let (rest, findings) = scanner.finish();
        out.extend_from_slice(&rest);
        (out, findings)
    }

    #[test]
    fn a_chat_stream_with_usage_passes_unchanged_and_yields_its_usage() {
        let body = fixture("chat_completion_stream_include_usage.sse");
        for size in [1, 7, 100, body.len()] {
            let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", false);
            let (out, findings) = run(&mut scanner, &body, size);
            assert_eq!(out, body, "chunks of {size}");
            let tokens = findings.usage.expect("usage").tokens();
            assert_eq!((tokens.prompt, tokens.completion), (10, 5));
        }
    }

    #[test]
    fn injected_usage_is_removed_so_the_client_sees_the_stream_it_asked_for() {
        let with_usage = fixture("chat_completion_stream_include_usage.sse");
        let without = fixture("chat_completion_stream.sse");
        for size in [1, 13, 4096] {
            let mut scanner = Scanner::new(
                Endpoint::ChatCompletions,
                "text/event-stream; charset=utf-8",
                true,
            );
            let (out, findings) = run(&mut scanner, &with_usage, size);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&without),
                "chunks of {size}"
            );
            assert_eq!(findings.usage.expect("usage").tokens().total(), 15);
        }
    }

    #[test]
    fn usage_is_found_and_stripped_whatever_the_spacing() {
        let body = concat!(
            "data: { \"id\": \"a\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hi\"}}], \"usage\" : null }\n\n",
            "data: {\"id\":\"a\",\"choices\":[],\"usage\": {\"prompt_tokens\": 7, \"completion_tokens\": 1, \"total_tokens\": 8}}\n\n",
            "data: [DONE]\n\n",
        );
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", true);
        let (out, findings) = run(&mut scanner, body.as_bytes(), 9);
        assert_eq!(
            String::from_utf8_lossy(&out),
            concat!(
                "data: {\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
                "data: [DONE]\n\n",
            )
        );
        assert_eq!(findings.usage.expect("usage").tokens().total(), 8);
        assert_eq!(findings.output_bytes, 2);
    }

    #[test]
    fn usage_next_to_choices_keeps_the_choices() {
        let body = "data: {\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"usage\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n";
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", true);
        let (out, findings) = run(&mut scanner, body.as_bytes(), 1000);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: {\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"usage\"}}]}\n\n"
        );
        assert_eq!(findings.usage.expect("usage").tokens().total(), 4);
    }

    #[test]
    fn crlf_line_endings_are_understood() {
        let body = String::from_utf8(fixture("chat_completion_stream_include_usage.sse"))
            .expect("utf-8")
            .replace('\n', "\r\n");
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", true);
        let (out, findings) = run(&mut scanner, body.as_bytes(), 50);
        assert!(findings.usage.is_some());
        assert!(!String::from_utf8_lossy(&out).contains("usage"));
    }

    #[test]
    fn a_responses_stream_yields_the_terminal_usage() {
        let body = fixture("responses_stream.sse");
        let mut scanner = Scanner::new(Endpoint::Responses, "text/event-stream", false);
        let (out, findings) = run(&mut scanner, &body, 33);
        assert_eq!(out, body);
        let tokens = findings.usage.expect("usage").tokens();
        assert_eq!((tokens.prompt, tokens.completion), (9, 2));
        assert_eq!(findings.output_bytes, "Hi!".len() as u64);
    }

    #[test]
    fn the_tier_an_answer_was_served_at_is_found_in_json_chunks_and_responses_events() {
        let mut json = Scanner::new(Endpoint::ChatCompletions, "application/json", false);
        let chat = fixture("chat_completion.json");
        assert_eq!(
            run(&mut json, &chat, 100).1.service_tier.as_deref(),
            Some("default")
        );
        let stream = fixture("chat_completion_stream_include_usage.sse");
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", true);
        assert_eq!(
            run(&mut scanner, &stream, 17).1.service_tier.as_deref(),
            Some("default")
        );
        let served = concat!(
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"service_tier\":\"priority\",",
            "\"usage\":{\"input_tokens\":9,\"output_tokens\":2,\"total_tokens\":11}}}\n\n",
        );
        let mut scanner = Scanner::new(Endpoint::Responses, "text/event-stream", false);
        assert_eq!(
            run(&mut scanner, served.as_bytes(), 5)
                .1
                .service_tier
                .as_deref(),
            Some("priority")
        );
        let embeddings = fixture("embeddings.json");
        let mut scanner = Scanner::new(Endpoint::Embeddings, "application/json", false);
        assert_eq!(run(&mut scanner, &embeddings, 100).1.service_tier, None);
    }

    #[test]
    fn a_cut_stream_reports_the_text_seen_so_far() {
        let body = fixture("chat_completion_stream.sse");
        let half = &body[..body.len() / 2];
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", false);
        for chunk in half.chunks(64) {
            scanner
                .feed(Bytes::copy_from_slice(chunk))
                .expect("bounded");
        }
        let (_, findings) = scanner.finish();
        assert!(findings.usage.is_none());
        assert!(findings.output_bytes > 0);
    }

    #[test]
    fn escaped_text_counts_as_sent_and_the_last_tier_named_is_the_one_served() {
        // The first chunk's text reads in place; the second has escapes,
        // which the count takes as the text they stand for ("a\"b\n": 4 bytes).
        let stream = concat!(
            "data: {\"service_tier\":\"priority\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"service_tier\":\"default\",\"choices\":[{\"delta\":{\"content\":\"a\\\"b\\n\"}}]}\n\n",
            "data: [DONE]\n\n",
        );
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", false);
        let (out, findings) = run(&mut scanner, stream.as_bytes(), 7);
        assert_eq!(out, stream.as_bytes(), "passed as it came");
        assert_eq!(findings.output_bytes, 2 + 4);
        assert_eq!(findings.service_tier.as_deref(), Some("default"));
    }

    #[test]
    fn an_error_event_inside_a_stream_is_noticed() {
        let body = b"data: {\"id\":\"x\",\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
        let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", false);
        let (_, findings) = run(&mut scanner, body, 10);
        assert_eq!(
            findings.error.expect("error").error_type.as_deref(),
            Some("server_error")
        );
    }

    /// Every recorded stream, with the endpoint it answers and whether
    /// quotawatch asked for its usage (and so strips it).
    fn fixture_streams() -> Vec<(&'static str, Endpoint, bool)> {
        vec![
            (
                "chat_completion_stream.sse",
                Endpoint::ChatCompletions,
                false,
            ),
            (
                "chat_completion_stream_include_usage.sse",
                Endpoint::ChatCompletions,
                false,
            ),
            (
                "chat_completion_stream_include_usage.sse",
                Endpoint::ChatCompletions,
                true,
            ),
            ("responses_stream.sse", Endpoint::Responses, false),
        ]
    }

    proptest::proptest! {
        /// However the network cuts a stream into chunks, the scanner finds
        /// the same usage and text, and passes on the same bytes, as when
        /// the stream comes whole.
        #[test]
        fn any_chunking_of_a_stream_yields_what_the_whole_stream_does(
            cuts in proptest::collection::vec(0usize..4096, 0..40),
            crlf in proptest::bool::ANY,
        ) {
            for (name, endpoint, strip) in fixture_streams() {
                let mut body = fixture(name);
                if crlf {
                    body = String::from_utf8(body).expect("text").replace('\n', "\r\n").into_bytes();
                }
                let mut whole = Scanner::new(endpoint, "text/event-stream", strip);
                let (whole_out, whole_findings) = run(&mut whole, &body, body.len());
                let mut points: Vec<usize> = cuts.iter().map(|cut| cut % (body.len() + 1)).collect();
                points.sort_unstable();
                let mut scanner = Scanner::new(endpoint, "text/event-stream", strip);
                let mut out = Vec::new();
                let mut from = 0;
                for to in points.into_iter().chain([body.len()]) {
                    let chunk = Bytes::copy_from_slice(&body[from..to]);
                    out.extend_from_slice(&scanner.feed(chunk).expect("bounded"));
                    from = to;
                }
                let (rest, findings) = scanner.finish();
                out.extend_from_slice(&rest);
                proptest::prop_assert_eq!(&out, &whole_out, "{}", name);
                proptest::prop_assert_eq!(&findings, &whole_findings, "{}", name);
                proptest::prop_assert!(findings.usage.is_some() || name == "chat_completion_stream.sse");
            }
        }
    }

    #[test]
    fn an_event_past_the_bound_breaks_the_stream_and_is_never_searched_twice() {
        for strip in [false, true] {
            let mut scanner = Scanner::new(Endpoint::ChatCompletions, "text/event-stream", strip);
            let piece = Bytes::from(vec![b'x'; 64 << 10]);
            let mut fed = 0;
            let overflow = loop {
                match scanner.feed(piece.clone()) {
                    Ok(_) => fed += piece.len(),
                    Err(error) => break error,
                }
                assert!(fed <= MAX_EVENT_BYTES, "fed {fed} bytes without an error");
            };
            assert_eq!(overflow, EventTooLong);
            if let Scanner::Sse(sse) = &scanner {
                assert_eq!(
                    sse.searched,
                    sse.pending.len(),
                    "the search went on where it stopped"
                );
            }
        }
    }

    #[test]
    fn json_bodies_yield_usage_whole_or_from_the_tail() {
        for name in ["chat_completion.json", "embeddings.json", "responses.json"] {
            let body = fixture(name);
            let mut scanner = Scanner::new(Endpoint::Other, "application/json", false);
            let (out, findings) = run(&mut scanner, &body, 100);
            assert_eq!(out, body, "JSON bodies pass unchanged");
            assert!(findings.usage.is_some(), "{name}");
        }
        // A body too large to keep whole: usage is found in the tail.
        let big = format!(
            "{{\"object\":\"list\",\"data\":[{}],\"model\":\"text-embedding-3-small\",\"usage\":{{\"prompt_tokens\":4096,\"total_tokens\":4096}}}}",
            vec!["0.0123456789"; 300_000].join(",")
        );
        let mut scanner = Scanner::new(Endpoint::Embeddings, "application/json", false);
        let (_, findings) = run(&mut scanner, big.as_bytes(), 16 << 10);
        assert_eq!(findings.usage.expect("usage").tokens().prompt, 4096);
    }

    proptest::proptest! {
        /// The lines are split_inclusive's, whatever the text: empty, with
        /// or without a last `\n`, with blank lines and `\r\n`.
        #[test]
        fn lines_are_split_inclusive_lines(text in "[a\\r\\n]{0,40}") {
            let text = text.as_bytes();
            let expected: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
            proptest::prop_assert_eq!(lines(text).collect::<Vec<_>>(), expected);
        }
    }
}
