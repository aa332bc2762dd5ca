//! What a request will cost in tokens, estimated before it is sent the way
//! OpenAI charges it: the prompt's tokens (with the model's tokenizer) plus
//! `n` times the completion limit the request sets (or a configured default).
//!
//! Each vocabulary (about 4 MiB, in the compact form of `vocabulary`) is
//! indexed on first need, in the background; until it is ready, prompts are
//! estimated at four bytes per token, which is how OpenAI's own rate limiter
//! approximates them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use std::fmt;

use axum::http::Method;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tiktoken_rs::tokenizer::{Tokenizer as ModelTokenizer, get_tokenizer};

use super::vocabulary::{CL100K_BASE, O200K_BASE, P50K_BASE, R50K_BASE, Vocabulary};

/// Which OpenAI API a request is for, by its path under `/v1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Endpoint {
    /// The endpoint of a request by its method and canonical path (see
    /// `path::normalise`). Only requests that carry a body are priced: a
    /// `GET /v1/chat/completions` lists stored completions. Letter case is
    /// ignored, so that a case-insensitive upstream could not serve an
    /// unpriced completion.
    pub fn of(method: &Method, path: &str) -> Self {
        if !carries_body(method) {
            return Endpoint::Other;
        }
        let under_v1 = path.strip_prefix("/v1").unwrap_or(path);
        [
            ("/chat/completions", Endpoint::ChatCompletions),
            ("/completions", Endpoint::Completions),
            ("/embeddings", Endpoint::Embeddings),
            ("/responses", Endpoint::Responses),
        ]
        .into_iter()
        .find(|(known, _)| under_v1.eq_ignore_ascii_case(known))
        .map_or(Endpoint::Other, |(_, endpoint)| endpoint)
    }

    /// Whether requests to this endpoint are priced, and so must carry a
    /// JSON object.
    pub fn is_priced(self) -> bool {
        self != Endpoint::Other
    }

    /// A bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Other => "other",
        }
    }
}

/// Whether requests of this method carry a body: the others are forwarded
/// without one.
pub fn carries_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    O200k,
    Cl100k,
    P50k,
    R50k,
}

impl Encoding {
    const COUNT: usize = 4;

    /// The model's encoding; unknown models fall back to o200k_base, the
    /// encoding of every current OpenAI model. o200k_harmony differs from
    /// o200k_base only in special tokens, which ordinary text never yields.
    fn of_model(model: &str) -> Self {
        match get_tokenizer(model) {
            Some(ModelTokenizer::Cl100kBase) => Encoding::Cl100k,
            Some(ModelTokenizer::P50kBase | ModelTokenizer::P50kEdit) => Encoding::P50k,
            Some(ModelTokenizer::R50kBase | ModelTokenizer::Gpt2) => Encoding::R50k,
            Some(ModelTokenizer::O200kBase | ModelTokenizer::O200kHarmony) | None => {
                Encoding::O200k
            }
        }
    }

    fn load(self) -> Option<Vocabulary> {
        let table = match self {
            Encoding::O200k => &O200K_BASE,
            Encoding::Cl100k => &CL100K_BASE,
            Encoding::P50k => &P50K_BASE,
            Encoding::R50k => &R50K_BASE,
        };
        Vocabulary::new(table)
            .inspect_err(|error| {
                tracing::error!(encoding = ?self, %error, "cannot load a tokenizer; prompts count by bytes");
            })
            .ok()
    }
}

/// Tokens a request is charged at admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    pub prompt: u64,
    pub completion: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

struct Slot {
    encoder: OnceLock<Vocabulary>,
    loading: AtomicBool,
}

/// How prompts are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// With the model's tiktoken encoding (exact; about 4 MiB of memory per
    /// encoding in use).
    Tiktoken,
    /// At four bytes per token, as OpenAI's own rate limiter approximates
    /// (no memory; estimates are settled with actual usage anyway).
    Bytes,
}

#[derive(Clone)]
pub struct Estimator {
    default_max_tokens: u64,
    tokenizer: Tokenizer,
    slots: Arc<[Slot; Encoding::COUNT]>,
}

/// Tokens OpenAI adds around every chat message, and to prime the reply.
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;
/// An image at high detail in a 1024x1024 frame; low detail is 85.
const IMAGE_TOKENS: u64 = 765;
const LOW_DETAIL_IMAGE_TOKENS: u64 = 85;

/// Keys whose string values are not text the model reads (identifiers,
/// enumerations, encoded media), and so are not counted.
const NOT_TEXT: &[&str] = &[
    "type",
    "role",
    "id",
    "call_id",
    "tool_call_id",
    "file_id",
    "file_data",
    "detail",
    "format",
    "data",
    "url",
    "image_url",
    "image",
    "input_audio",
    "audio",
    "status",
];

/// Text up to this size is counted exactly; BPE merging slows down sharply
/// on long runs without whitespace, and one request must not stall a
/// worker, so longer texts (and longer runs) count at four bytes per token.
const EXACT_TEXT_LIMIT: usize = 32 << 10;
const EXACT_RUN_LIMIT: usize = 1 << 10;
/// How much of one request's text is counted exactly at most.
const EXACT_BUDGET: usize = 256 << 10;

fn bytes_estimate(text: &str) -> u64 {
    text.len().div_ceil(4) as u64
}

fn has_long_run(text: &str) -> bool {
    text.split(|c: char| c.is_whitespace())
        .any(|run| run.len() > EXACT_RUN_LIMIT)
}

impl Estimator {
    pub fn new(default_max_tokens: u64, tokenizer: Tokenizer) -> Self {
        let slot = || Slot {
            encoder: OnceLock::new(),
            loading: AtomicBool::new(false),
        };
        Self {
            default_max_tokens,
            tokenizer,
            slots: Arc::new([slot(), slot(), slot(), slot()]),
        }
    }

    fn slot(&self, encoding: Encoding) -> &Slot {
        &self.slots[encoding as usize]
    }

    /// Loads the encoding for `model` now, on this thread, so that counts
    /// are exact from the first call (tests use this).
    pub fn load_now(&self, model: &str) {
        let slot = self.slot(Encoding::of_model(model));
        if slot.encoder.get().is_none()
            && let Some(encoder) = Encoding::of_model(model).load()
        {
            let _ = slot.encoder.set(encoder);
        }
    }

    /// The encoder if it is loaded; otherwise starts loading it in the
    /// background (once) and returns `None`.
    fn encoder(&self, encoding: Encoding) -> Option<&Vocabulary> {
        if self.tokenizer == Tokenizer::Bytes {
            return None;
        }
        let slot = self.slot(encoding);
        if let Some(encoder) = slot.encoder.get() {
            return Some(encoder);
        }
        if !slot.loading.swap(true, Ordering::AcqRel) {
            let slots = self.slots.clone();
            std::thread::spawn(move || {
                if let Some(encoder) = encoding.load() {
                    let _ = slots[encoding as usize].encoder.set(encoder);
                }
            });
        }
        None
    }

    /// The charge for a request to `endpoint` whose JSON `body` was read
    /// into `sizing`. The body is walked once more to count its texts,
    /// without building a tree of it: memory stays bounded by the largest
    /// string with escapes in it, whatever the body's size. Every string is
    /// decoded on the way, so the walk also refuses what is not valid JSON
    /// text (a lone surrogate escape, for one).
    pub fn estimate(
        &self,
        endpoint: Endpoint,
        sizing: &Sizing,
        body: &[u8],
    ) -> Result<Estimate, serde_json::Error> {
        let mut counting = Counting {
            encoder: self.encoder(Encoding::of_model(sizing.model.unwrap_or(""))),
            budget: EXACT_BUDGET,
        };
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let prompt = Prompt {
            endpoint,
            counting: &mut counting,
        }
        .deserialize(&mut deserializer)?;
        deserializer.end()?;
        let completion = match endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses => {
                let limit = sizing.completion_limit.unwrap_or(self.default_max_tokens);
                let n = sizing.n.filter(|n| *n >= 1).unwrap_or(1);
                limit.saturating_mul(n)
            }
            Endpoint::Embeddings | Endpoint::Other => 0,
        };
        Ok(Estimate { prompt, completion })
    }
}

/// The scalars of a request that size its estimate besides its texts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizing<'a> {
    pub model: Option<&'a str>,
    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens`.
    pub completion_limit: Option<u64>,
    pub n: Option<u64>,
}

/// Counting the texts of one request, within its budget of exact counting.
struct Counting<'a> {
    encoder: Option<&'a Vocabulary>,
    budget: usize,
}

impl Counting<'_> {
    fn count(&mut self, text: &str) -> u64 {
        let exact = self.encoder.filter(|_| {
            text.len() <= EXACT_TEXT_LIMIT && text.len() <= self.budget && !has_long_run(text)
        });
        match exact {
            Some(encoder) => {
                self.budget -= text.len();
                encoder.count(text) as u64
            }
            None => bytes_estimate(text),
        }
    }
}

// The walkers below read a request body as a stream of JSON events (serde's
// visitors), each knowing what its part of the body means for the count.
// None of them keeps a value: strings are counted where they lie, and what
// does not count is still walked through, so that every string is decoded.

/// The visitor methods for the scalar values (booleans, numbers, `null`)
/// a walker reads through without counting them: each answers `$value`.
macro_rules! answer_scalars {
    ($value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// Any JSON value, walked and dropped.
pub struct Valid;

impl<'de> Deserialize<'de> for Valid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Valid)
    }
}

impl<'de> Visitor<'de> for Valid {
    type Value = Valid;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    answer_scalars!(Valid);
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Valid)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Valid, A::Error> {
        while seq.next_element::<Valid>()?.is_some() {}
        Ok(Valid)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Valid, A::Error> {
        while map.next_key::<Valid>()?.is_some() {
            map.next_value::<Valid>()?;
        }
        Ok(Valid)
    }
}

/// The top-level object of a request to one endpoint: the prompt's tokens.
struct Prompt<'c, 'v> {
    endpoint: Endpoint,
    counting: &'c mut Counting<'v>,
}

impl<'de> DeserializeSeed<'de> for Prompt<'_, '_> {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Prompt<'_, '_> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let counting = self.counting;
        let mut tokens = match self.endpoint {
            Endpoint::ChatCompletions => REPLY_PRIMING,
            _ => 0,
        };
        while let Some(key) = map.next_key::<Key>()? {
            let key = key.0.as_deref().unwrap_or("");
            let counted = match (self.endpoint, key) {
                (Endpoint::ChatCompletions, "messages") => {
                    map.next_value_seed(Messages(counting))?
                }
                (Endpoint::ChatCompletions, "tools" | "functions")
                | (Endpoint::Responses, "tools") => {
                    // Tool definitions count as their JSON text, which is
                    // how they reach the model.
                    let raw = map.next_value::<&RawValue>()?;
                    serde_json::from_str::<Valid>(raw.get()).map_err(de::Error::custom)?;
                    counting.count(raw.get())
                }
                (Endpoint::Completions, "prompt") | (Endpoint::Embeddings, "input") => {
                    map.next_value_seed(Input(counting))?.tokens()
                }
                (Endpoint::Responses, "instructions" | "input") => {
                    map.next_value_seed(Text(counting))?
                }
                _ => {
                    map.next_value::<Valid>()?;
                    0
                }
            };
            tokens = tokens.saturating_add(counted);
        }
        Ok(tokens)
    }
}

/// A key of an object, kept only when it is short enough to be one the
/// walkers look for.
struct Key(Option<String>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, key: &str) -> Result<Key, E> {
        Ok(Key((key.len() <= 32).then(|| key.to_owned())))
    }
}

/// Chat messages: each counts its texts plus OpenAI's per-message overhead.
struct Messages<'c, 'v>(&'c mut Counting<'v>);

impl<'de> DeserializeSeed<'de> for Messages<'_, '_> {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Messages<'_, '_> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut tokens = 0u64;
        while let Some(message) = seq.next_element_seed(Text(self.0))? {
            tokens = tokens.saturating_add(PER_MESSAGE + message);
        }
        Ok(tokens)
    }
    // Anything else is not a list of messages: the upstream refuses it, so
    // it counts nothing, but it is still read through.
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<u64, A::Error> {
        Valid.visit_map(map).map(|_| 0)
    }
    answer_scalars!(0);
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(0)
    }
}

/// Tokens of every text string in a value, skipping identifiers and media.
struct Text<'c, 'v>(&'c mut Counting<'v>);

impl<'de> DeserializeSeed<'de> for Text<'_, '_> {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text<'_, '_> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("text")
    }
    fn visit_str<E>(self, text: &str) -> Result<u64, E> {
        Ok(self.0.count(text))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut tokens = 0u64;
        while let Some(item) = seq.next_element_seed(Text(self.0))? {
            tokens = tokens.saturating_add(item);
        }
        Ok(tokens)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut tokens = 0u64;
        while let Some(key) = map.next_key::<Key>()? {
            let counted = match key.0.as_deref().unwrap_or("") {
                "image_url" | "image" => map.next_value_seed(Image)?,
                key if NOT_TEXT.contains(&key) => {
                    map.next_value::<Valid>()?;
                    0
                }
                _ => map.next_value_seed(Text(self.0))?,
            };
            tokens = tokens.saturating_add(counted);
        }
        Ok(tokens)
    }
    answer_scalars!(0);
}

/// An image: a fixed amount by its detail, its data never read as text.
struct Image;

impl<'de> DeserializeSeed<'de> for Image {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Image {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an image")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut low = false;
        while let Some(key) = map.next_key::<Key>()? {
            if key.0.as_deref() == Some("detail") {
                low = map.next_value::<Detail>()?.0;
            } else {
                map.next_value::<Valid>()?;
            }
        }
        Ok(if low {
            LOW_DETAIL_IMAGE_TOKENS
        } else {
            IMAGE_TOKENS
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<u64, A::Error> {
        Valid.visit_seq(seq).map(|_| IMAGE_TOKENS)
    }
    answer_scalars!(IMAGE_TOKENS);
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(IMAGE_TOKENS)
    }
}

/// Whether an image's `detail` is `"low"`.
struct Detail(bool);

impl<'de> Deserialize<'de> for Detail {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DetailVisitor)
    }
}

struct DetailVisitor;

impl<'de> Visitor<'de> for DetailVisitor {
    type Value = Detail;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an image detail")
    }
    fn visit_str<E>(self, detail: &str) -> Result<Detail, E> {
        Ok(Detail(detail == "low"))
    }
    answer_scalars!(Detail(false));
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Detail, A::Error> {
        Valid.visit_seq(seq).map(|_| Detail(false))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Detail, A::Error> {
        Valid.visit_map(map).map(|_| Detail(false))
    }
}

/// Prompt input given as text, a list of texts, or token ids.
struct Input<'c, 'v>(&'c mut Counting<'v>);

/// What one input item counts.
enum InputTokens {
    /// A token id, which counts as one token when the whole list is ids.
    Id,
    Tokens(u64),
}

impl InputTokens {
    fn tokens(self) -> u64 {
        match self {
            InputTokens::Id => 0,
            InputTokens::Tokens(tokens) => tokens,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Input<'_, '_> {
    type Value = InputTokens;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<InputTokens, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Input<'_, '_> {
    type Value = InputTokens;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("prompt input")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputTokens, A::Error> {
        let (mut items, mut tokens, mut all_ids) = (0u64, 0u64, true);
        while let Some(item) = seq.next_element_seed(Input(self.0))? {
            items += 1;
            all_ids &= matches!(item, InputTokens::Id);
            tokens = tokens.saturating_add(item.tokens());
        }
        Ok(InputTokens::Tokens(if all_ids { items } else { tokens }))
    }
    fn visit_i64<E>(self, _: i64) -> Result<InputTokens, E> {
        Ok(InputTokens::Id)
    }
    fn visit_u64<E>(self, _: u64) -> Result<InputTokens, E> {
        Ok(InputTokens::Id)
    }
    fn visit_f64<E>(self, _: f64) -> Result<InputTokens, E> {
        Ok(InputTokens::Id)
    }
    fn visit_str<E>(self, text: &str) -> Result<InputTokens, E> {
        Ok(InputTokens::Tokens(self.0.count(text)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<InputTokens, A::Error> {
        Text(self.0).visit_map(map).map(InputTokens::Tokens)
    }
    fn visit_bool<E>(self, _: bool) -> Result<InputTokens, E> {
        Ok(InputTokens::Tokens(0))
    }
    fn visit_unit<E>(self) -> Result<InputTokens, E> {
        Ok(InputTokens::Tokens(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Estimates a request given as JSON, read as the proxy reads it.
    trait EstimateJson {
        fn estimate_json(&self, endpoint: Endpoint, body: &Value) -> Estimate;
    }

    impl EstimateJson for Estimator {
        fn estimate_json(&self, endpoint: Endpoint, body: &Value) -> Estimate {
            crate::proxy::request::read(self, endpoint, body.to_string().as_bytes())
                .expect("a valid request")
                .estimate
        }
    }

    fn loaded() -> Estimator {
        let estimator = Estimator::new(1024, Tokenizer::Tiktoken);
        estimator.load_now("gpt-4o-mini");
        estimator.load_now("gpt-4");
        estimator
    }

    #[test]
    fn endpoints_are_recognised_by_method_and_path() {
        let post = |path| Endpoint::of(&Method::POST, path);
        assert_eq!(post("/v1/chat/completions"), Endpoint::ChatCompletions);
        assert_eq!(post("/v1/Chat/Completions"), Endpoint::ChatCompletions);
        assert_eq!(post("/v1/responses"), Endpoint::Responses);
        assert_eq!(post("/v1/embeddings"), Endpoint::Embeddings);
        assert_eq!(post("/v1/models"), Endpoint::Other);
        assert_eq!(
            Endpoint::of(&Method::GET, "/v1/chat/completions"),
            Endpoint::Other,
            "listing stored completions costs nothing"
        );
    }

    #[test]
    fn chat_counts_messages_with_overhead_plus_n_times_the_completion_limit() {
        let estimator = loaded();
        let body = json!({"model": "gpt-4o-mini", "n": 2, "max_tokens": 100,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]});
        let estimate = estimator.estimate_json(Endpoint::ChatCompletions, &body);
        // "Be brief." and "Hello there!" are 3 tokens each in o200k_base.
        assert_eq!(estimate.prompt, 2 * PER_MESSAGE + 3 + 3 + REPLY_PRIMING);
        assert_eq!(estimate.completion, 200);
        let newer = json!({"model": "gpt-4o-mini", "max_completion_tokens": 50, "messages": []});
        assert_eq!(
            estimator
                .estimate_json(Endpoint::ChatCompletions, &newer)
                .completion,
            50
        );
        let unset = json!({"model": "gpt-4o-mini", "messages": []});
        assert_eq!(
            estimator
                .estimate_json(Endpoint::ChatCompletions, &unset)
                .completion,
            1024
        );
    }

    #[test]
    fn images_count_a_fixed_amount_and_their_data_is_not_read_as_text() {
        let estimator = loaded();
        let huge = "A".repeat(100_000);
        let body = json!({"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{huge}"), "detail": "low"}}
        ]}]});
        let estimate = estimator.estimate_json(Endpoint::ChatCompletions, &body);
        assert!(estimate.prompt < 200, "{estimate:?}");
        assert!(estimate.prompt >= LOW_DETAIL_IMAGE_TOKENS);
    }

    #[test]
    fn embeddings_and_completions_accept_text_lists_and_token_ids() {
        let estimator = loaded();
        let texts =
            json!({"model": "text-embedding-3-small", "input": ["Hello there!", "Hello there!"]});
        assert_eq!(
            estimator.estimate_json(Endpoint::Embeddings, &texts),
            Estimate {
                prompt: 6,
                completion: 0
            }
        );
        let ids = json!({"model": "text-embedding-3-small", "input": [1, 2, 3, 4]});
        assert_eq!(
            estimator.estimate_json(Endpoint::Embeddings, &ids).prompt,
            4
        );
        let legacy =
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Hello there!", "max_tokens": 7});
        assert_eq!(
            estimator
                .estimate_json(Endpoint::Completions, &legacy)
                .completion,
            7
        );
    }

    #[test]
    fn responses_count_instructions_input_and_max_output_tokens() {
        let estimator = loaded();
        let body = json!({"model": "gpt-4.1", "instructions": "Be brief.", "input": "Hello there!", "max_output_tokens": 64});
        assert_eq!(
            estimator.estimate_json(Endpoint::Responses, &body),
            Estimate {
                prompt: 6,
                completion: 64
            }
        );
        let items = json!({"model": "gpt-4.1", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there!"}]}]});
        assert_eq!(
            estimator.estimate_json(Endpoint::Responses, &items).prompt,
            3
        );
    }

    #[test]
    fn the_encoding_follows_the_model_and_falls_back_to_o200k() {
        assert_eq!(
            Encoding::of_model("gpt-4o-mini-2024-07-18"),
            Encoding::O200k
        );
        assert_eq!(Encoding::of_model("gpt-4"), Encoding::Cl100k);
        assert_eq!(
            Encoding::of_model("text-embedding-3-small"),
            Encoding::Cl100k
        );
        assert_eq!(Encoding::of_model("some-future-model"), Encoding::O200k);
    }

    #[test]
    fn before_the_tokenizer_is_loaded_four_bytes_count_as_one_token() {
        let estimator = Estimator::new(0, Tokenizer::Tiktoken);
        let body = json!({"model": "gpt-4o", "input": "abcdefgh"});
        assert_eq!(
            estimator.estimate_json(Endpoint::Embeddings, &body).prompt,
            2
        );
    }

    #[test]
    fn long_texts_and_runs_are_estimated_by_bytes() {
        let estimator = loaded();
        let run = "x".repeat(EXACT_RUN_LIMIT + 1);
        let body = json!({"model": "gpt-4o", "input": run});
        assert_eq!(
            estimator.estimate_json(Endpoint::Embeddings, &body).prompt,
            bytes_estimate(&run)
        );
        let long = "word ".repeat(EXACT_TEXT_LIMIT / 5 + 1);
        let body = json!({"model": "gpt-4o", "input": long});
        assert_eq!(
            estimator.estimate_json(Endpoint::Embeddings, &body).prompt,
            bytes_estimate(&long)
        );
        // Past the request's budget, the rest is estimated by bytes.
        let chunk = "Hello there! ".repeat(1000);
        let many: Vec<&str> = vec![&chunk; 40];
        let body = json!({"model": "gpt-4o", "input": many});
        let estimate = estimator.estimate_json(Endpoint::Embeddings, &body).prompt;
        assert!(
            estimate > 40 * 3000 && estimate < 40 * bytes_estimate(&chunk),
            "{estimate}"
        );
    }

    #[test]
    fn the_bytes_tokenizer_never_loads_an_encoding() {
        let estimator = Estimator::new(0, Tokenizer::Bytes);
        let body = json!({"model": "gpt-4o", "input": "abcdefgh"});
        for _ in 0..3 {
            assert_eq!(
                estimator.estimate_json(Endpoint::Embeddings, &body).prompt,
                2
            );
        }
        assert!(
            estimator
                .slots
                .iter()
                .all(|slot| !slot.loading.load(Ordering::Acquire))
        );
    }
}
