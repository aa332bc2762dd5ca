//! What a call costs: a table of model prices, how the model name a client
//! sends finds its price, and the exact cost of a call's usage.
//!
//! Money is counted in whole pico-dollars (10^-12 USD). Every per-token
//! price OpenAI publishes is a whole number of them (a few are half a
//! nano-dollar, such as $0.0625 per million cached tokens), so a cost is an
//! exact product and sums never drift.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxBuildHasher;

/// An amount of money in pico-dollars (10^-12 USD).
pub type PicoUsd = u64;

/// An amount of money in nano-dollars (10^-9 USD): what usd limits and
/// their counters hold. Counters in Redis are doubles, exact up to 2^53:
/// in nano-dollars that is about $9 million, in pico-dollars only $9,007.
pub type NanoUsd = u64;

pub const NANO_USD_PER_DOLLAR: NanoUsd = 1_000_000_000;

const PICO_USD_PER_NANO_USD: PicoUsd = 1_000;

/// The largest usd limit: a million dollars. Counts stay exact well past
/// it (a settlement may overshoot a limit), and a limit in dollars read as
/// a JSON number (a double) converts to the exact nano-dollar below it.
pub const MAX_USD_LIMIT: NanoUsd = 1_000_000 * NANO_USD_PER_DOLLAR;

/// A cost as a usd counter charges it: rounded up to whole nano-dollars,
/// so that a budget errs toward refusing, by under a nano-dollar a call.
pub fn charged(cost: PicoUsd) -> NanoUsd {
    cost.div_ceil(PICO_USD_PER_NANO_USD)
}

/// `dollars` in nano-dollars, rounded to the nearest one; `None` unless
/// it is a finite amount of at least zero. Amounts too large for a
/// nano-dollar count come out as `u64::MAX`, which no limit allows.
pub fn nano_usd(dollars: f64) -> Option<NanoUsd> {
    (dollars.is_finite() && dollars >= 0.0)
        .then(|| (dollars * NANO_USD_PER_DOLLAR as f64).round() as NanoUsd)
}

/// `amount` in dollars, as the nearest double.
pub fn dollars(amount: NanoUsd) -> f64 {
    amount as f64 / NANO_USD_PER_DOLLAR as f64
}

/// `amount` as texts write it: a dollar sign, the dollars with their
/// digits grouped, and the cents, with smaller fractions where there are
/// any ("$1,234.50", "$0.00042").
pub fn format_dollars(amount: NanoUsd) -> String {
    let whole = super::notification::group_digits(amount / NANO_USD_PER_DOLLAR);
    let fraction = format!("{:09}", amount % NANO_USD_PER_DOLLAR);
    let fraction = fraction.trim_end_matches('0');
    format!("${whole}.{fraction:0<2}")
}

/// The prompt length above which some models charge their long-prompt
/// rates (`*_above_272k_tokens` in the table).
pub const LONG_PROMPT_TOKENS: u64 = 272_000;

/// The processing tier a request asks for (`service_tier`), which some
/// models price apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    #[default]
    Standard,
    Flex,
    Priority,
}

impl Tier {
    /// The tier a request's `service_tier` asks for: `flex` and `priority`
    /// are priced apart; `auto`, `default` and any other at the standard
    /// rates.
    pub fn requested(service_tier: &str) -> Tier {
        [Tier::Flex, Tier::Priority]
            .into_iter()
            .find(|tier| tier.name() == service_tier)
            .unwrap_or_default()
    }

    pub const fn name(self) -> &'static str {
        match self {
            Tier::Standard => "standard",
            Tier::Flex => "flex",
            Tier::Priority => "priority",
        }
    }
}

/// What one token costs, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rates {
    /// A prompt (input) token not served from the prompt cache.
    pub input: PicoUsd,
    /// A prompt token served from the prompt cache.
    pub cached_input: PicoUsd,
    /// A completion (output) token, reasoning tokens included.
    pub output: PicoUsd,
}

/// What a model's tokens cost, per tier, for ordinary and for long prompts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Price {
    /// What the model is for (`chat`, `responses`, `embedding`, ...).
    pub mode: String,
    standard: Rates,
    /// Other tiers and long prompts, where the table prices them apart.
    special: BTreeMap<(Tier, bool), Rates>,
}

impl Price {
    /// A model's price at its standard rates.
    pub fn new(mode: impl Into<String>, standard: Rates) -> Self {
        Self {
            mode: mode.into(),
            standard,
            special: BTreeMap::new(),
        }
    }

    /// Prices `tier` apart, for ordinary prompts or, with `long`, for
    /// prompts over [`LONG_PROMPT_TOKENS`].
    pub fn with(mut self, tier: Tier, long: bool, rates: Rates) -> Self {
        if (tier, long) == (Tier::Standard, false) {
            self.standard = rates;
        } else {
            self.special.insert((tier, long), rates);
        }
        self
    }

    /// The rates a request of `tier` with a prompt of `prompt_tokens` pays:
    /// the tier's own rates where the table has them, else the standard
    /// ones; the long-prompt rates of either when the prompt is long.
    pub fn rates(&self, tier: Tier, prompt_tokens: u64) -> Rates {
        let long = prompt_tokens > LONG_PROMPT_TOKENS;
        // Most calls are standard-tier calls with ordinary prompts, whose
        // rates need no search: every call is priced, twice.
        if self.special.is_empty() || (tier, long) == (Tier::Standard, false) {
            return self.standard;
        }
        // The tier asked for at this length, then the standard tier at this
        // length, then (for a long prompt) the same at ordinary length.
        let lengths: &[bool] = if long { &[true, false] } else { &[false] };
        lengths
            .iter()
            .flat_map(|long| [tier, Tier::Standard].map(|tier| (tier, *long)))
            .find_map(|key| match key {
                (Tier::Standard, false) => Some(self.standard),
                key => self.special.get(&key).copied(),
            })
            .unwrap_or(self.standard)
    }

    /// The standard tier's rates for ordinary prompts.
    pub fn standard(&self) -> Rates {
        self.standard
    }

    /// The rates the table gives apart from the standard ones.
    pub fn special(&self) -> impl Iterator<Item = ((Tier, bool), Rates)> + '_ {
        self.special.iter().map(|(key, rates)| (*key, *rates))
    }

    /// The exact cost of a call that used `tokens` at `tier`: uncached
    /// prompt tokens at the input rate, cached ones at the cached rate,
    /// completion tokens (reasoning included) at the output rate.
    pub fn cost(&self, tokens: TokenCounts, tier: Tier) -> PicoUsd {
        let rates = self.rates(tier, tokens.prompt);
        let cached = tokens.cached.min(tokens.prompt);
        let uncached = tokens.prompt - cached;
        uncached
            .saturating_mul(rates.input)
            .saturating_add(cached.saturating_mul(rates.cached_input))
            .saturating_add(tokens.completion.saturating_mul(rates.output))
    }
}

/// The tokens a call was billed for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Prompt (input) tokens, cached ones included.
    pub prompt: u64,
    /// Of the prompt tokens, those served from the prompt cache.
    pub cached: u64,
    /// Completion (output) tokens, reasoning tokens included.
    pub completion: u64,
}

/// What a model the price table does not know is charged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnpricedRates {
    /// The table's highest standard rate of each kind of token.
    #[default]
    Highest,
    /// The operator's rates.
    Fixed(Rates),
}

/// Model prices, as of the day they were taken.
#[derive(Clone, Debug)]
pub struct PriceTable {
    /// When the prices were taken (`YYYY-MM-DD`), or where from.
    pub taken: String,
    /// By name, in order, for listing.
    models: BTreeMap<String, Price>,
    /// `models` again, hashed, for finding a call's model: every call is
    /// priced, and a search of the ordered map compares the name with
    /// some eight others. The names are the table's, so a client's model
    /// name only probes it.
    by_name: HashMap<String, Price, FxBuildHasher>,
    /// What a model the table does not know is charged by default: the
    /// highest rate of each kind of token among the table's standard
    /// rates, so that a budget errs toward refusing rather than
    /// overspending; worked out once.
    highest: Price,
}

impl PartialEq for PriceTable {
    fn eq(&self, other: &Self) -> bool {
        // The rest is derived from these two.
        self.taken == other.taken && self.models == other.models
    }
}

impl Eq for PriceTable {}

impl Default for PriceTable {
    fn default() -> Self {
        Self::new(String::new(), BTreeMap::new())
    }
}

impl PriceTable {
    pub fn new(taken: impl Into<String>, models: BTreeMap<String, Price>) -> Self {
        let by_name = models
            .iter()
            .map(|(name, price)| (name.clone(), price.clone()))
            .collect();
        let highest = Price::new(UNPRICED_MODE, highest_standard_rates(&models));
        Self {
            taken: taken.into(),
            models,
            by_name,
            highest,
        }
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price `model` is charged at: its own (see
    /// [`resolve`](Self::resolve)), else the `unpriced` rates.
    pub fn price_or(&self, model: &str, unpriced: UnpricedRates) -> Cow<'_, Price> {
        match (self.resolve(model), unpriced) {
            (Some((_, price)), _) => Cow::Borrowed(price),
            (None, UnpricedRates::Highest) => Cow::Borrowed(&self.highest),
            (None, UnpricedRates::Fixed(rates)) => Cow::Owned(Price::new(UNPRICED_MODE, rates)),
        }
    }

    pub fn models(&self) -> impl Iterator<Item = (&str, &Price)> {
        self.models
            .iter()
            .map(|(name, price)| (name.as_str(), price))
    }

    /// The price of `model` as a client names it, with the name it was
    /// found under: the exact name; else a dated snapshot as its base name
    /// (`gpt-4o-mini-2024-07-18`, `gpt-4-0613`); else a fine-tuned model
    /// (`ft:gpt-4o-mini-2024-07-18:org::id`) at its base model's fine-tuned
    /// price, then at its base model's price.
    pub fn resolve(&self, model: &str) -> Option<(&str, &Price)> {
        let find = |name: &str| {
            self.by_name
                .get_key_value(name)
                .map(|(name, price)| (name.as_str(), price))
        };
        // Every priced call asks, twice: the exact name, the common case,
        // and a dated snapshot cost no allocation.
        match model.strip_prefix("ft:") {
            Some(rest) => {
                let base = rest.split(':').next().unwrap_or_default();
                find(model)
                    .or_else(|| find(&format!("ft:{base}")))
                    .or_else(|| find(&format!("ft:{}", undated(base))))
                    .or_else(|| find(base))
                    .or_else(|| find(undated(base)))
            }
            None => find(model).or_else(|| find(undated(model))),
        }
    }
}

/// The `mode` of the price charged to a model the table does not know.
const UNPRICED_MODE: &str = "unpriced";

/// The highest rate of each kind of token among `models`' standard rates.
fn highest_standard_rates(models: &BTreeMap<String, Price>) -> Rates {
    models.values().fold(Rates::default(), |highest, price| {
        let rates = price.standard;
        Rates {
            input: highest.input.max(rates.input),
            cached_input: highest.cached_input.max(rates.cached_input),
            output: highest.output.max(rates.output),
        }
    })
}

/// A model name without the date of its snapshot: `-YYYY-MM-DD` or `-MMDD`
/// at its end.
fn undated(model: &str) -> &str {
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let bytes = model.as_bytes();
    if bytes.len() > 11 && bytes[bytes.len() - 11] == b'-' {
        let date = &model[model.len() - 10..];
        let parts: Vec<&str> = date.split('-').collect();
        if let [year, month, day] = parts[..]
            && year.len() == 4
            && month.len() == 2
            && day.len() == 2
            && [year, month, day].into_iter().all(digits)
        {
            return &model[..model.len() - 11];
        }
    }
    if bytes.len() > 5 && bytes[bytes.len() - 5] == b'-' && digits(&model[model.len() - 4..]) {
        return &model[..model.len() - 5];
    }
    model
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Dollars per million tokens, in pico-dollars per token.
    pub(crate) fn per_million(dollars: f64) -> PicoUsd {
        (dollars * 1_000_000.0).round() as PicoUsd
    }

    /// Rates in dollars per million tokens.
    pub(crate) fn rates(input: f64, cached: f64, output: f64) -> Rates {
        Rates {
            input: per_million(input),
            cached_input: per_million(cached),
            output: per_million(output),
        }
    }

    fn table() -> PriceTable {
        let mut models = BTreeMap::new();
        models.insert(
            "gpt-4o-mini".to_owned(),
            Price::new("chat", rates(0.15, 0.075, 0.6)).with(
                Tier::Priority,
                false,
                rates(0.25, 0.125, 1.0),
            ),
        );
        models.insert(
            "gpt-4o-mini-2024-07-18".to_owned(),
            Price::new("chat", rates(0.15, 0.075, 0.6)),
        );
        models.insert(
            "ft:gpt-4o-mini-2024-07-18".to_owned(),
            Price::new("chat", rates(0.3, 0.15, 1.2)),
        );
        models.insert(
            "gpt-4-0613".to_owned(),
            Price::new("chat", rates(30.0, 30.0, 60.0)),
        );
        models.insert(
            "gpt-5.4".to_owned(),
            Price::new("chat", rates(2.5, 0.25, 15.0))
                .with(Tier::Flex, false, rates(1.25, 0.13, 7.5))
                .with(Tier::Standard, true, rates(5.0, 0.5, 22.5)),
        );
        PriceTable::new("2026-12-02", models)
    }

    #[test]
    fn a_model_resolves_by_name_then_snapshot_then_fine_tuned_base() {
        let table = table();
        let found = |model| table.resolve(model).map(|(name, _)| name);
        assert_eq!(found("gpt-4o-mini"), Some("gpt-4o-mini"));
        assert_eq!(
            found("gpt-4o-mini-2024-07-18"),
            Some("gpt-4o-mini-2024-07-18")
        );
        assert_eq!(
            found("gpt-4o-mini-2025-01-01"),
            Some("gpt-4o-mini"),
            "a new snapshot"
        );
        assert_eq!(found("gpt-4-0613"), Some("gpt-4-0613"));
        assert_eq!(
            found("ft:gpt-4o-mini-2024-07-18:acme::9xYz"),
            Some("ft:gpt-4o-mini-2024-07-18"),
            "fine-tuned models have prices of their own"
        );
        assert_eq!(
            found("ft:gpt-5.4:acme::9xYz"),
            Some("gpt-5.4"),
            "else their base model's"
        );
        assert_eq!(found("gpt-4o-mini-tts"), None);
        assert_eq!(found("nonsense-1234"), None);
        assert_eq!(undated("o1-2024-12-17"), "o1");
        assert_eq!(undated("gpt-3.5-turbo-0125"), "gpt-3.5-turbo");
        assert_eq!(undated("gpt-4o"), "gpt-4o");
        assert_eq!(undated("gpt-4o-2024-1-01"), "gpt-4o-2024-1-01");
    }

    #[test]
    fn cost_is_exact_by_kind_of_token() {
        let table = table();
        let (_, mini) = table.resolve("gpt-4o-mini").expect("priced");
        // 1,000 prompt tokens of which 400 cached, 500 completion tokens:
        // 600 × $0.15/M + 400 × $0.075/M + 500 × $0.60/M = $0.00042.
        let tokens = TokenCounts {
            prompt: 1000,
            cached: 400,
            completion: 500,
        };
        assert_eq!(mini.cost(tokens, Tier::Standard), 420_000_000);
        // Priority: 600 × 0.25 + 400 × 0.125 + 500 × 1.0 = $0.0007.
        assert_eq!(mini.cost(tokens, Tier::Priority), 700_000_000);
        // Flex is not priced apart for this model: the standard rates.
        assert_eq!(mini.cost(tokens, Tier::Flex), 420_000_000);
        // Cached tokens never exceed the prompt they are part of.
        let odd = TokenCounts {
            prompt: 10,
            cached: 50,
            completion: 0,
        };
        assert_eq!(mini.cost(odd, Tier::Standard), 10 * per_million(0.075));
    }

    #[test]
    fn a_long_prompt_pays_the_long_rates_of_its_tier_or_the_standard_tier() {
        let table = table();
        let (_, model) = table.resolve("gpt-5.4").expect("priced");
        let long = TokenCounts {
            prompt: LONG_PROMPT_TOKENS + 1,
            cached: 0,
            completion: 0,
        };
        assert_eq!(
            model.rates(Tier::Standard, long.prompt),
            rates(5.0, 0.5, 22.5)
        );
        // Flex has no long-prompt rates of its own: the standard tier's.
        assert_eq!(model.rates(Tier::Flex, long.prompt), rates(5.0, 0.5, 22.5));
        assert_eq!(
            model.rates(Tier::Flex, LONG_PROMPT_TOKENS),
            rates(1.25, 0.13, 7.5)
        );
        // Half a nano-dollar is a whole number of pico-dollars.
        assert_eq!(per_million(0.0625), 62_500);
    }

    #[test]
    fn a_cost_is_charged_in_whole_nano_dollars_rounded_up() {
        assert_eq!(charged(0), 0);
        assert_eq!(charged(1), 1, "a fraction of a nano-dollar costs one");
        assert_eq!(charged(1_000), 1);
        assert_eq!(charged(1_001), 2);
        // Half a nano-dollar per cached token, as some models charge.
        assert_eq!(charged(per_million(0.0625)), 63);
        assert_eq!(charged(420_000_000), 420_000);
    }

    #[test]
    fn dollars_convert_to_nano_dollars_and_read_as_money() {
        assert_eq!(nano_usd(12.5), Some(12_500_000_000));
        assert_eq!(nano_usd(0.000_000_001), Some(1));
        assert_eq!(nano_usd(0.0), Some(0));
        assert_eq!(
            nano_usd(999_999.999_999_999),
            Some(999_999_999_999_999),
            "nine places exact below the largest limit"
        );
        for refused in [-0.01, f64::NAN, f64::INFINITY] {
            assert_eq!(nano_usd(refused), None, "{refused}");
        }
        assert_eq!(dollars(12_500_000_000), 12.5);
        assert_eq!(dollars(MAX_USD_LIMIT), 1_000_000.0);
        assert_eq!(format_dollars(49_980_000_000), "$49.98");
        assert_eq!(format_dollars(50 * NANO_USD_PER_DOLLAR), "$50.00");
        assert_eq!(format_dollars(420_000), "$0.00042");
        assert_eq!(format_dollars(1_234_500_000_000), "$1,234.50");
        assert_eq!(format_dollars(0), "$0.00");
    }

    #[test]
    fn a_model_without_a_price_pays_the_unpriced_rates() {
        let table = table();
        let price = table.price_or("gpt-4o-mini", UnpricedRates::Highest);
        assert_eq!(price.standard(), rates(0.15, 0.075, 0.6));
        // The test table's highest rates are gpt-4-0613's.
        let price = table.price_or("acme-llm", UnpricedRates::Highest);
        assert_eq!(price.standard(), rates(30.0, 30.0, 60.0));
        let own = rates(1.0, 1.0, 2.0);
        let price = table.price_or("acme-llm", UnpricedRates::Fixed(own));
        assert_eq!(price.standard(), own);
    }

    #[test]
    fn a_requested_service_tier_names_its_rates() {
        assert_eq!(Tier::requested("flex"), Tier::Flex);
        assert_eq!(Tier::requested("priority"), Tier::Priority);
        for standard in ["auto", "default", "scale", "FLEX"] {
            assert_eq!(Tier::requested(standard), Tier::Standard, "{standard}");
        }
    }
}
