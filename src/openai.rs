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
}
