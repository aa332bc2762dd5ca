//! OpenAI's wire format, as far as quotawatch reads it: the `usage` object
//! of responses (in all its shapes) and the error object. Shared by the REST
//! API (apps report what OpenAI answered) and the proxy (which reads the
//! answers itself), so both understand exactly the same things.

use serde::Deserialize;
use utoipa::ToSchema;

use crate::engine::TokenUsage;

/// Token counts in either OpenAI shape: chat/completions/embeddings
/// (`prompt_tokens`, `completion_tokens`) or the Responses API
/// (`input_tokens`, `output_tokens`). Unknown fields are ignored, so a
/// response's `usage` object can be passed as it is.
#[derive(Deserialize, ToSchema, Debug, Default, Clone, PartialEq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub prompt_tokens_details: Option<PromptDetails>,
    pub input_tokens_details: Option<PromptDetails>,
    pub completion_tokens_details: Option<CompletionDetails>,
    pub output_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, ToSchema, Debug, Default, Clone, PartialEq)]
pub struct PromptDetails {
    pub cached_tokens: Option<u64>,
}

#[derive(Deserialize, ToSchema, Debug, Default, Clone, PartialEq)]
pub struct CompletionDetails {
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    /// The counts as quotawatch records them. Cached tokens are part of the
    /// prompt and reasoning tokens part of the completion, as OpenAI counts.
    pub fn tokens(&self) -> TokenUsage {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        // Embeddings report prompt and total only; a bare total is all prompt.
        let prompt = prompt.or(self.total_tokens.filter(|_| completion.is_none()));
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .or(self.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens);
        TokenUsage {
            prompt: prompt.unwrap_or(0),
            completion: completion.unwrap_or(0),
            cached: cached.unwrap_or(0),
            reasoning: reasoning.unwrap_or(0),
        }
    }
}

/// The `error` object of an OpenAI error body. Azure's has no `type`.
#[derive(Deserialize, ToSchema, Debug, Default, Clone, PartialEq)]
pub struct ErrorObject {
    #[serde(rename = "type")]
    pub error_type: Option<String>,
    /// A string, or rarely a number (Azure sends `"429"`, some proxies `429`).
    #[serde(default, deserialize_with = "code_as_string")]
    pub code: Option<String>,
    pub message: Option<String>,
    pub param: Option<String>,
}

fn code_as_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(match value {
        Some(serde_json::Value::String(code)) => Some(code),
        Some(serde_json::Value::Number(code)) => Some(code.to_string()),
        _ => None,
    })
}

/// `{"error": {...}}`.
#[derive(Deserialize, Debug, Default)]
pub struct ErrorEnvelope {
    pub error: ErrorObject,
}

impl ErrorEnvelope {
    /// Reads an error body; `None` when it is not OpenAI's error shape.
    pub fn parse(body: &[u8]) -> Option<ErrorObject> {
        serde_json::from_slice::<ErrorEnvelope>(body)
            .ok()
            .map(|envelope| envelope.error)
    }
}

/// Whether `model` is of a reasoning family (o1, o3, o4, gpt-5), which
/// spends hidden reasoning tokens that OpenAI bills as output before and
/// between the text it streams. A fine-tuned model (`ft:o4-mini:…`) is of
/// its base's family.
pub fn is_reasoning_model(model: &str) -> bool {
    let base = model.strip_prefix("ft:").unwrap_or(model);
    let family = |prefix: &str| {
        base.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', ':', '.']))
    };
    ["o1", "o3", "o4"].into_iter().any(family) || base.starts_with("gpt-5")
}

#[cfg(test)]
mod tests {

    #[test]
    fn reasoning_families_are_recognised_by_name() {
        for model in [
            "o1",
            "o1-mini",
            "o3",
            "o3-pro-2025-06-10",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.1",
            "ft:o4-mini:acme::abc",
        ] {
            assert!(is_reasoning_model(model), "{model}");
        }
        for model in [
            "gpt-4o",
            "gpt-4.1-mini",
            "o10",
            "text-embedding-3-small",
            "omni-moderation-latest",
            "ft:gpt-4o-mini:acme::x",
        ] {
            assert!(!is_reasoning_model(model), "{model}");
        }
    }

    use super::*;

    use crate::domain::openai_fixture as fixture;

    fn usage_of(name: &str) -> TokenUsage {
        let body: serde_json::Value = serde_json::from_slice(&fixture(name)).expect("JSON");
        serde_json::from_value::<Usage>(body["usage"].clone())
            .expect("usage")
            .tokens()
    }

    #[test]
    fn reads_usage_in_every_shape() {
        let chat = usage_of("chat_completion.json");
        assert_eq!((chat.prompt, chat.completion), (19, 10));
        let embeddings = usage_of("embeddings.json");
        assert_eq!((embeddings.prompt, embeddings.completion), (8, 0));
        let responses = usage_of("responses.json");
        assert_eq!((responses.prompt, responses.completion), (9, 2));
        let details: Usage = serde_json::from_str(
            r#"{"prompt_tokens":100,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":30}}"#,
        )
        .expect("usage");
        let tokens = details.tokens();
        assert_eq!(
            (tokens.cached, tokens.reasoning, tokens.total()),
            (64, 30, 150)
        );
    }

    #[test]
    fn reads_error_bodies_including_azure() {
        let error = ErrorEnvelope::parse(&fixture(
            "error_429_insufficient_quota_legacy_null_code.json",
        ))
        .expect("error");
        assert_eq!(
            (error.error_type.as_deref(), error.code),
            (Some("insufficient_quota"), None)
        );
        let azure = ErrorEnvelope::parse(&fixture("azure_error_429.json")).expect("error");
        assert_eq!(
            (azure.error_type, azure.code.as_deref()),
            (None, Some("429"))
        );
        assert!(ErrorEnvelope::parse(b"<html>Bad gateway</html>").is_none());
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{Map, Value, json};

        use super::*;

        /// Any JSON value, nested a little.
        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("\\PC{0,12}", inner, 0..4)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        /// A usage object in one of OpenAI's shapes, its fields in any order
        /// and mixed with fields quotawatch does not read, with the counts it
        /// must read from it.
        fn usage() -> impl Strategy<Value = (String, TokenUsage)> {
            let count = prop_oneof![0..100_000u64, any::<u64>()];
            let shape = prop::sample::select(vec!["chat", "responses", "embeddings"]);
            let extra = prop::collection::vec(("[a-z_]{1,12}", any_json()), 0..4);
            (
                shape,
                count.clone(),
                count.clone(),
                count.clone(),
                count,
                any::<bool>(),
                extra,
            )
                .prop_flat_map(
                    |(shape, prompt, completion, cached, reasoning, details, extra)| {
                        let (input, output, input_details, output_details) = match shape {
                            "responses" => (
                                "input_tokens",
                                "output_tokens",
                                "input_tokens_details",
                                "output_tokens_details",
                            ),
                            _ => (
                                "prompt_tokens",
                                "completion_tokens",
                                "prompt_tokens_details",
                                "completion_tokens_details",
                            ),
                        };
                        let embeddings = shape == "embeddings";
                        let mut fields = vec![
                            (input.to_owned(), json!(prompt)),
                            (
                                "total_tokens".to_owned(),
                                json!(prompt.saturating_add(if embeddings {
                                    0
                                } else {
                                    completion
                                })),
                            ),
                        ];
                        if !embeddings {
                            fields.push((output.to_owned(), json!(completion)));
                        }
                        if details && !embeddings {
                            fields.push((
                                input_details.to_owned(),
                                json!({"cached_tokens": cached, "audio_tokens": 0}),
                            ));
                            fields.push((
                                output_details.to_owned(),
                                json!({"reasoning_tokens": reasoning}),
                            ));
                        }
                        let known: Vec<String> =
                            fields.iter().map(|(name, _)| name.clone()).collect();
                        fields.extend(extra.into_iter().filter(|(name, _)| {
                            !known.contains(name)
                                && !name.ends_with("tokens")
                                && !name.ends_with("details")
                        }));
                        let expected = TokenUsage {
                            prompt,
                            completion: if embeddings { 0 } else { completion },
                            cached: if details && !embeddings { cached } else { 0 },
                            reasoning: if details && !embeddings { reasoning } else { 0 },
                        };
                        Just(fields).prop_shuffle().prop_map(move |fields| {
                            let object: Map<String, Value> = fields.into_iter().collect();
                            (Value::Object(object).to_string(), expected)
                        })
                    },
                )
        }

        proptest! {
            #[test]
            fn usage_in_any_shape_reads_as_its_counts((text, expected) in usage()) {
                let parsed: Usage = serde_json::from_str(&text).expect("valid usage parses");
                let tokens = parsed.tokens();
                prop_assert_eq!(tokens, expected);
                prop_assert_eq!(tokens.total(), expected.prompt.saturating_add(expected.completion));
            }

            #[test]
            fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), value in any_json()) {
                if let Ok(usage) = serde_json::from_slice::<Usage>(&bytes) {
                    let _ = usage.tokens().total();
                }
                if let Ok(usage) = serde_json::from_value::<Usage>(value.clone()) {
                    let _ = usage.tokens().total();
                }
                let _ = ErrorEnvelope::parse(&bytes);
                let _ = ErrorEnvelope::parse(json!({"error": value}).to_string().as_bytes());
            }
        }
    }
}
