//! Price tables as files: the community-maintained format of the LLM-gateway
//! ecosystem (`model_prices_and_context_window.json`, one object per model
//! with USD per token), read into a `domain::price::PriceTable`.
//!
//! A copy of OpenAI's entries is compiled in (`prices/openai-models.json`,
//! with the day it was taken); an operator's own file in the same format
//! lays its entries over it, so a price that changed needs no new release.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use crate::domain::limits::Metric;
use crate::domain::price::{
    NanoUsd, PicoUsd, Price, PriceTable, Rates, Tier, TokenCounts, UnpricedRates, charged,
};
use crate::domain::window::Usage;
use crate::sync::{read, write};

/// OpenAI's entries of the table, as compiled in.
const BUILT_IN: &str = include_str!("../prices/openai-models.json");

/// The day the compiled-in prices were taken.
pub const BUILT_IN_TAKEN: &str = "2026-12-02";

/// A price file that cannot be used, naming what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceFileError {
    #[error("cannot read the price file {path}: {error}")]
    Read { path: String, error: String },
    #[error("the price file is not a JSON object of models: {0}")]
    Shape(String),
    #[error("model {model:?}: {field} is {value}, not a price in USD per token")]
    Price {
        model: String,
        field: String,
        value: String,
    },
}

/// The prices in force: the built-in table, with the operator's file
/// (`QUOTAWATCH_PRICES_FILE`) laid over it, read again on demand (SIGHUP, or
/// the admin's `POST /api/prices/reload`).
pub struct PriceBook {
    file: Option<PathBuf>,
    table: RwLock<Arc<PriceTable>>,
}

impl PriceBook {
    /// Reads the operator's file, if there is one: a file that cannot be
    /// used stops the start, as any invalid setting does.
    pub fn open(file: Option<PathBuf>) -> Result<Self, PriceFileError> {
        let table = read_table(file.as_ref())?;
        Ok(Self {
            file,
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// The prices in force.
    pub fn current(&self) -> Arc<PriceTable> {
        read(&self.table).clone()
    }

    /// Reads the operator's file again. A file that cannot be used leaves
    /// the prices in force as they were, so a typo never stops pricing.
    pub fn reload(&self) -> Result<Arc<PriceTable>, PriceFileError> {
        let table = Arc::new(read_table(self.file.as_ref())?);
        *write(&self.table) = table.clone();
        Ok(table)
    }
}

/// The prices calls are charged at: the book in force, and what a model it
/// does not know is charged (`QUOTAWATCH_UNPRICED_MODEL_RATE`).
pub struct Pricing {
    pub book: Arc<PriceBook>,
    pub unpriced: UnpricedRates,
}

impl Pricing {
    /// The built-in prices, with the default for unpriced models.
    pub fn built_in() -> Self {
        Self {
            book: Arc::new(PriceBook {
                file: None,
                table: RwLock::new(Arc::new(built_in())),
            }),
            unpriced: UnpricedRates::default(),
        }
    }

    /// Whether the prices in force know `model`.
    pub fn knows(&self, model: &str) -> bool {
        read(&self.book.table).resolve(model).is_some()
    }

    /// What `tokens` of `model` cost at `tier`, as a usd counter charges
    /// it (whole nano-dollars, rounded up): uncached prompt tokens at
    /// the input rate, cached ones at the cached rate, completion tokens
    /// at the output rate. An estimate passes its prompt and its
    /// completion allowance; a settlement what the call used. A call that
    /// names no model costs nothing: there is no price to apply, and
    /// OpenAI answers such a call with an error, unbilled. (Apps that
    /// report through the REST API name the model for their budget to
    /// count; what they report is theirs to say in any case.)
    pub fn charge(&self, model: Option<&str>, tokens: TokenCounts, tier: Tier) -> NanoUsd {
        let Some(model) = model else {
            return 0;
        };
        // Read in place: every call is priced twice, and copying the `Arc`
        // out would write its shared count as well as the lock's.
        let table = read(&self.book.table);
        charged(table.price_or(model, self.unpriced).cost(tokens, tier))
    }

    /// What one call of `tokens` uses of each metric: a request, its
    /// tokens, and their cost ([`charge`](Self::charge)). The one place a
    /// call's tokens become usage, for an estimate and for what was used
    /// alike.
    pub fn usage(&self, model: Option<&str>, tokens: TokenCounts, tier: Tier) -> Usage {
        let total = tokens.prompt.saturating_add(tokens.completion);
        Usage::call(total).with(Metric::Usd, self.charge(model, tokens, tier))
    }
}

fn read_table(file: Option<&PathBuf>) -> Result<PriceTable, PriceFileError> {
    let Some(path) = file else {
        return Ok(built_in());
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| PriceFileError::Read {
        path: shown.clone(),
        error: error.to_string(),
    })?;
    with_file(&text, &shown)
}

/// The compiled-in table.
pub fn built_in() -> PriceTable {
    parse(BUILT_IN, BUILT_IN_TAKEN).unwrap_or_else(|error| {
        // The file is part of the source tree, and a test reads it: this
        // cannot happen in a released binary.
        panic!("the built-in price table is broken: {error}")
    })
}

/// The built-in table with the entries of an operator's file laid over it:
/// an entry of the file replaces the built-in one of that name.
pub fn with_file(text: &str, source: &str) -> Result<PriceTable, PriceFileError> {
    let own = parse(text, source)?;
    let mut models: BTreeMap<String, Price> = built_in()
        .models()
        .map(|(name, price)| (name.to_owned(), price.clone()))
        .collect();
    models.extend(
        own.models()
            .map(|(name, price)| (name.to_owned(), price.clone())),
    );
    Ok(PriceTable::new(
        format!("{BUILT_IN_TAKEN}, with {source}"),
        models,
    ))
}

/// Reads a table: every entry with a price per input token; others (images
/// by the pixel, audio by the second, the format's `sample_spec`) are not
/// priced by the token and left out.
pub fn parse(text: &str, taken: &str) -> Result<PriceTable, PriceFileError> {
    let entries: Map<String, Value> =
        serde_json::from_str(text).map_err(|error| PriceFileError::Shape(error.to_string()))?;
    let mut models = BTreeMap::new();
    for (name, entry) in entries {
        if name == "sample_spec" {
            continue;
        }
        let Some(fields) = entry.as_object() else {
            return Err(PriceFileError::Shape(format!(
                "the entry of {name:?} is not an object"
            )));
        };
        if let Some(price) = price_of(&name, fields)? {
            models.insert(name, price);
        }
    }
    Ok(PriceTable::new(taken, models))
}

/// How the format names a rate for prompts over `LONG_PROMPT_TOKENS`.
const LONG_SUFFIX: &str = "_above_272k_tokens";

/// The tiers as the format names them: a suffix on each field.
const TIER_SUFFIXES: [(Tier, &str); 3] = [
    (Tier::Standard, ""),
    (Tier::Flex, "_flex"),
    (Tier::Priority, "_priority"),
];

fn price_of(model: &str, fields: &Map<String, Value>) -> Result<Option<Price>, PriceFileError> {
    let rate = |field: String| -> Result<Option<PicoUsd>, PriceFileError> {
        fields
            .get(&field)
            .map(|value| pico_per_token(model, &field, value))
            .transpose()
    };
    let Some(input) = rate("input_cost_per_token".to_owned())? else {
        return Ok(None);
    };
    let mode = fields
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("chat")
        .to_owned();
    let mut price = Price::new(
        mode,
        Rates {
            input,
            cached_input: input,
            output: 0,
        },
    );
    for (tier, suffix) in TIER_SUFFIXES {
        for (long, length) in [(false, ""), (true, LONG_SUFFIX)] {
            let Some(input) = rate(format!("input_cost_per_token{length}{suffix}"))? else {
                continue;
            };
            // A rate the entry leaves out for this tier or prompt length is
            // the one the call would pay without them, in the order
            // `Price::rates` falls back: the standard tier's at this length,
            // then the tier's ordinary one, then the standard one. (An entry
            // pricing only the input of a tier apart must not make its
            // output free.)
            let inherited = |base: &str| -> Result<Option<PicoUsd>, PriceFileError> {
                for (length, suffix) in [(length, suffix), (length, ""), ("", suffix), ("", "")] {
                    if let Some(rate) = rate(format!("{base}{length}{suffix}"))? {
                        return Ok(Some(rate));
                    }
                }
                Ok(None)
            };
            let rates = Rates {
                input,
                // Without a cached rate, cached tokens cost what others do.
                cached_input: inherited("cache_read_input_token_cost")?.unwrap_or(input),
                output: inherited("output_cost_per_token")?.unwrap_or(0),
            };
            price = price.with(tier, long, rates);
        }
    }
    Ok(Some(price))
}

/// A price in USD per token as pico-dollars, refused unless it is a whole
/// number of them (every published price is), so that costs stay exact.
fn pico_per_token(model: &str, field: &str, value: &Value) -> Result<PicoUsd, PriceFileError> {
    let refused = || PriceFileError::Price {
        model: model.to_owned(),
        field: field.to_owned(),
        value: value.to_string(),
    };
    let usd = value.as_f64().ok_or_else(refused)?;
    let pico = usd * 1e12;
    let whole = pico.round();
    // A dollar amount read from decimal text is off by far less than a
    // thousandth of a pico-dollar when it is a whole number of them.
    if !(0.0..=1e15).contains(&whole) || (pico - whole).abs() > 1e-3 {
        return Err(refused());
    }
    Ok(whole as PicoUsd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::price::{LONG_PROMPT_TOKENS, TokenCounts};
    use crate::openai::Usage;

    fn table() -> PriceTable {
        built_in()
    }

    /// The usage a fixture of OpenAI's answers reports.
    fn fixture_usage(name: &str) -> TokenCounts {
        let body: Value =
            serde_json::from_slice(&crate::domain::openai_fixture(name)).expect("JSON fixture");
        let usage: Usage = serde_json::from_value(body["usage"].clone()).expect("usage");
        let tokens = usage.tokens();
        TokenCounts {
            prompt: tokens.prompt,
            cached: tokens.cached,
            completion: tokens.completion,
        }
    }

    #[test]
    fn the_built_in_table_reads_whole_with_every_model_of_the_fixtures() {
        let table = table();
        assert!(table.len() > 150, "{} models", table.len());
        for model in [
            "gpt-4o-mini",
            "gpt-4o",
            "o3",
            "gpt-5",
            "text-embedding-3-small",
        ] {
            assert!(table.resolve(model).is_some(), "{model}");
        }
        let (_, embedding) = table.resolve("text-embedding-3-small").expect("priced");
        assert_eq!(embedding.mode, "embedding");
    }

    #[test]
    fn each_fixture_costs_what_a_hand_computation_says() {
        let table = table();
        let cost = |fixture: &str, model: &str| {
            let (_, price) = table.resolve(model).expect("priced");
            price.cost(fixture_usage(fixture), Tier::Standard)
        };
        // gpt-4o-mini-2024-07-18: 19 prompt tokens at $0.15/M and 10
        // completion tokens at $0.60/M: 2,850,000 + 6,000,000 pico-dollars.
        assert_eq!(
            cost("chat_completion.json", "gpt-4o-mini-2024-07-18"),
            8_850_000
        );
        // text-embedding-3-small: 8 input tokens at $0.02/M, no output.
        assert_eq!(cost("embeddings.json", "text-embedding-3-small"), 160_000);
        // The Responses fixture's gpt-4.1 (dated snapshot, priced as its
        // base if it has no entry): 9 input tokens at $2/M, 2 output
        // tokens at $8/M.
        let body: Value = serde_json::from_slice(&crate::domain::openai_fixture("responses.json"))
            .expect("JSON fixture");
        let model = body["model"].as_str().expect("model");
        let (_, price) = table.resolve(model).expect("priced");
        assert_eq!(
            (
                price.rates(Tier::Standard, 9).input,
                price.rates(Tier::Standard, 9).output
            ),
            (2_000_000, 8_000_000),
            "{model}"
        );
        assert_eq!(cost("responses.json", model), 9 * 2_000_000 + 2 * 8_000_000);
    }

    #[test]
    fn half_nano_dollar_prices_are_exact() {
        let table = table();
        let (_, gpt5) = table.resolve("gpt-5").expect("priced");
        assert_eq!(gpt5.rates(Tier::Flex, 1).cached_input, 62_500);
        assert_eq!(gpt5.rates(Tier::Priority, 1).input, 2_500_000);
    }

    #[test]
    fn a_rate_an_entry_leaves_out_for_a_tier_or_a_long_prompt_is_the_standard_one() {
        // The built-in gpt-5-nano prices only the input of the priority
        // tier apart: its cached and output tokens cost the standard rates.
        let table = table();
        let (_, nano) = table.resolve("gpt-5-nano").expect("priced");
        assert_eq!(
            nano.rates(Tier::Priority, 1),
            Rates {
                input: 2_500_000,
                cached_input: 5_000,
                output: 400_000
            }
        );
        let own = r#"{"acme-long": {
            "input_cost_per_token": 1e-06, "output_cost_per_token": 4e-06,
            "cache_read_input_token_cost": 1e-07,
            "input_cost_per_token_flex": 5e-07, "output_cost_per_token_flex": 2e-06,
            "input_cost_per_token_above_272k_tokens": 2e-06,
            "input_cost_per_token_above_272k_tokens_flex": 1e-06
        }}"#;
        let table = with_file(own, "prices.json").expect("valid");
        let (_, price) = table.resolve("acme-long").expect("priced");
        let long = LONG_PROMPT_TOKENS + 1;
        assert_eq!(
            price.rates(Tier::Standard, long),
            Rates {
                input: 2_000_000,
                cached_input: 100_000,
                output: 4_000_000
            },
            "the standard rates where the long prompt's are left out"
        );
        assert_eq!(
            price.rates(Tier::Flex, long),
            Rates {
                input: 1_000_000,
                cached_input: 100_000,
                output: 2_000_000
            },
            "the tier's ordinary output rate before the standard one"
        );
    }

    #[test]
    fn an_operators_file_lays_its_prices_over_the_built_in_ones() {
        let own = r#"{
            "gpt-4o-mini": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, "mode": "chat"},
            "acme-model": {"input_cost_per_token": 3e-7, "cache_read_input_token_cost": 1e-7}
        }"#;
        let table = with_file(own, "prices.json").expect("valid");
        let (_, mini) = table.resolve("gpt-4o-mini").expect("priced");
        assert_eq!(mini.rates(Tier::Standard, 1).input, 1_000_000);
        let (_, own_model) = table.resolve("acme-model").expect("added");
        assert_eq!(
            own_model.rates(Tier::Standard, 1),
            Rates {
                input: 300_000,
                cached_input: 100_000,
                output: 0
            }
        );
        assert!(table.resolve("gpt-4o").is_some(), "the rest stays");
        assert!(table.taken.contains("prices.json"));
    }

    #[test]
    fn a_broken_file_is_refused_naming_the_model_and_field() {
        assert!(matches!(
            parse("[1, 2]", "x"),
            Err(PriceFileError::Shape(_))
        ));
        let negative = parse(r#"{"m": {"input_cost_per_token": -1e-6}}"#, "x");
        assert_eq!(
            negative,
            Err(PriceFileError::Price {
                model: "m".to_owned(),
                field: "input_cost_per_token".to_owned(),
                value: "-1e-6".to_owned(),
            })
        );
        let fraction = parse(r#"{"m": {"input_cost_per_token": 1.0000001e-6}}"#, "x");
        assert!(
            matches!(fraction, Err(PriceFileError::Price { .. })),
            "{fraction:?}"
        );
        let text = parse(r#"{"m": {"input_cost_per_token": "cheap"}}"#, "x");
        assert!(matches!(text, Err(PriceFileError::Price { .. })));
    }
}
