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

use serde_json::Value;
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
    pub fn of_path(path: &str) -> Self {
        match path.trim_end_matches('/') {
            "/chat/completions" => Endpoint::ChatCompletions,
            "/completions" => Endpoint::Completions,
            "/embeddings" => Endpoint::Embeddings,
            "/responses" => Endpoint::Responses,
            _ => Endpoint::Other,
        }
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

    /// The charge for a request to `endpoint` with JSON `body`.
    pub fn estimate(&self, endpoint: Endpoint, body: &Value) -> Estimate {
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        let mut counting = Counting {
            encoder: self.encoder(Encoding::of_model(model)),
            budget: EXACT_BUDGET,
        };
        let prompt = match endpoint {
            Endpoint::ChatCompletions => {
                let messages = body.get("messages").and_then(Value::as_array);
                let per_message: u64 = messages
                    .into_iter()
                    .flatten()
                    .map(|message| PER_MESSAGE + counting.text(message))
                    .sum();
                let tools: u64 = ["tools", "functions"]
                    .iter()
                    .filter_map(|key| body.get(*key))
                    .map(|tools| counting.count(&tools.to_string()))
                    .sum();
                per_message + REPLY_PRIMING + tools
            }
            Endpoint::Completions => body.get("prompt").map_or(0, |p| counting.input(p)),
            Endpoint::Embeddings => body.get("input").map_or(0, |i| counting.input(i)),
            Endpoint::Responses => {
                let instructions = body.get("instructions").map_or(0, |i| counting.text(i));
                let input = body.get("input").map_or(0, |i| counting.text(i));
                let tools = body
                    .get("tools")
                    .map_or(0, |tools| counting.count(&tools.to_string()));
                instructions + input + tools
            }
            Endpoint::Other => 0,
        };
        let completion = match endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses => {
                let limit = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                    .iter()
                    .find_map(|key| body.get(*key).and_then(Value::as_u64))
                    .unwrap_or(self.default_max_tokens);
                let n = body
                    .get("n")
                    .and_then(Value::as_u64)
                    .filter(|n| *n >= 1)
                    .unwrap_or(1);
                limit.saturating_mul(n)
            }
            Endpoint::Embeddings | Endpoint::Other => 0,
        };
        Estimate { prompt, completion }
    }
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

    /// Tokens of every text string in `value`, skipping identifiers and media.
    fn text(&mut self, value: &Value) -> u64 {
        match value {
            Value::String(text) => self.count(text),
            Value::Array(items) => items.iter().map(|item| self.text(item)).sum(),
            Value::Object(fields) => fields
                .iter()
                .map(|(key, value)| match key.as_str() {
                    "image_url" | "image" => {
                        let low = value.get("detail").and_then(Value::as_str) == Some("low");
                        if low {
                            LOW_DETAIL_IMAGE_TOKENS
                        } else {
                            IMAGE_TOKENS
                        }
                    }
                    key if NOT_TEXT.contains(&key) => 0,
                    _ => self.text(value),
                })
                .sum(),
            Value::Number(_) | Value::Bool(_) | Value::Null => 0,
        }
    }

    /// Prompt input given as text, a list of texts, or token ids.
    fn input(&mut self, input: &Value) -> u64 {
        match input {
            Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
            Value::Array(items) => items.iter().map(|item| self.input(item)).sum(),
            other => self.text(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loaded() -> Estimator {
        let estimator = Estimator::new(1024, Tokenizer::Tiktoken);
        estimator.load_now("gpt-4o-mini");
        estimator.load_now("gpt-4");
        estimator
    }

    #[test]
    fn endpoints_are_recognised_by_path() {
        assert_eq!(
            Endpoint::of_path("/chat/completions"),
            Endpoint::ChatCompletions
        );
        assert_eq!(Endpoint::of_path("/responses"), Endpoint::Responses);
        assert_eq!(Endpoint::of_path("/embeddings/"), Endpoint::Embeddings);
        assert_eq!(Endpoint::of_path("/models"), Endpoint::Other);
    }

    #[test]
    fn chat_counts_messages_with_overhead_plus_n_times_the_completion_limit() {
        let estimator = loaded();
        let body = json!({"model": "gpt-4o-mini", "n": 2, "max_tokens": 100,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]});
        let estimate = estimator.estimate(Endpoint::ChatCompletions, &body);
        // "Be brief." and "Hello there!" are 3 tokens each in o200k_base.
        assert_eq!(estimate.prompt, 2 * PER_MESSAGE + 3 + 3 + REPLY_PRIMING);
        assert_eq!(estimate.completion, 200);
        let newer = json!({"model": "gpt-4o-mini", "max_completion_tokens": 50, "messages": []});
        assert_eq!(
            estimator
                .estimate(Endpoint::ChatCompletions, &newer)
                .completion,
            50
        );
        let unset = json!({"model": "gpt-4o-mini", "messages": []});
        assert_eq!(
            estimator
                .estimate(Endpoint::ChatCompletions, &unset)
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
        let estimate = estimator.estimate(Endpoint::ChatCompletions, &body);
        assert!(estimate.prompt < 200, "{estimate:?}");
        assert!(estimate.prompt >= LOW_DETAIL_IMAGE_TOKENS);
    }

    #[test]
    fn embeddings_and_completions_accept_text_lists_and_token_ids() {
        let estimator = loaded();
        let texts =
            json!({"model": "text-embedding-3-small", "input": ["Hello there!", "Hello there!"]});
        assert_eq!(
            estimator.estimate(Endpoint::Embeddings, &texts),
            Estimate {
                prompt: 6,
                completion: 0
            }
        );
        let ids = json!({"model": "text-embedding-3-small", "input": [1, 2, 3, 4]});
        assert_eq!(estimator.estimate(Endpoint::Embeddings, &ids).prompt, 4);
        let legacy =
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Hello there!", "max_tokens": 7});
        assert_eq!(
            estimator
                .estimate(Endpoint::Completions, &legacy)
                .completion,
            7
        );
    }

    #[test]
    fn responses_count_instructions_input_and_max_output_tokens() {
        let estimator = loaded();
        let body = json!({"model": "gpt-4.1", "instructions": "Be brief.", "input": "Hello there!", "max_output_tokens": 64});
        assert_eq!(
            estimator.estimate(Endpoint::Responses, &body),
            Estimate {
                prompt: 6,
                completion: 64
            }
        );
        let items = json!({"model": "gpt-4.1", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there!"}]}]});
        assert_eq!(estimator.estimate(Endpoint::Responses, &items).prompt, 3);
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
        assert_eq!(estimator.estimate(Endpoint::Embeddings, &body).prompt, 2);
    }

    #[test]
    fn long_texts_and_runs_are_estimated_by_bytes() {
        let estimator = loaded();
        let run = "x".repeat(EXACT_RUN_LIMIT + 1);
        let body = json!({"model": "gpt-4o", "input": run});
        assert_eq!(
            estimator.estimate(Endpoint::Embeddings, &body).prompt,
            bytes_estimate(&run)
        );
        let long = "word ".repeat(EXACT_TEXT_LIMIT / 5 + 1);
        let body = json!({"model": "gpt-4o", "input": long});
        assert_eq!(
            estimator.estimate(Endpoint::Embeddings, &body).prompt,
            bytes_estimate(&long)
        );
        // Past the request's budget, the rest is estimated by bytes.
        let chunk = "Hello there! ".repeat(1000);
        let many: Vec<&str> = vec![&chunk; 40];
        let body = json!({"model": "gpt-4o", "input": many});
        let estimate = estimator.estimate(Endpoint::Embeddings, &body).prompt;
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
            assert_eq!(estimator.estimate(Endpoint::Embeddings, &body).prompt, 2);
        }
        assert!(
            estimator
                .slots
                .iter()
                .all(|slot| !slot.loading.load(Ordering::Acquire))
        );
    }
}
