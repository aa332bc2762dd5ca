//! Spend by model over the current calendar periods, and the cheaper model
//! a budget notification suggests for it.
//!
//! The counters say what a workspace spent in all; this book says on which
//! models, with the tokens of each kind that cost it (its *token mix*), so
//! that the status can show cost per model and a budget notification can
//! price the same workload at another model's rates.

use std::collections::BTreeMap;

use super::limits::Period;
use super::price::{NanoUsd, PicoUsd, PriceTable, Rates};
use super::time::Timestamp;
use super::window::Calendars;
use super::workspace::Model;

/// The most models one period keeps apart; calls of further models count
/// under [`OTHER_MODELS`](super::model::OTHER_MODELS), so that made-up
/// names cannot grow a workspace's memory. (History keeps at most
/// `MAX_MODELS_PER_DAY` names a day, and a month has up to 31 days.)
pub const MAX_MODELS_PER_PERIOD: usize = 100;

/// What calls of one model used and cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelSpend {
    /// Prompt tokens, cached ones included.
    pub prompt: u64,
    /// Of the prompt tokens, those served from the prompt cache.
    pub cached: u64,
    /// Completion tokens, reasoning included.
    pub completion: u64,
    /// What the calls were charged, in nano-dollars.
    pub usd: NanoUsd,
}

impl std::ops::AddAssign for ModelSpend {
    fn add_assign(&mut self, other: Self) {
        self.prompt = self.prompt.saturating_add(other.prompt);
        self.cached = self.cached.saturating_add(other.cached);
        self.completion = self.completion.saturating_add(other.completion);
        self.usd = self.usd.saturating_add(other.usd);
    }
}

impl ModelSpend {
    /// What these tokens cost at `rates`, per kind of token, in
    /// pico-dollars. A mix summed over many calls is priced at its rates
    /// as they stand, never at long-prompt rates its sum would reach.
    pub fn cost_at(&self, rates: Rates) -> PicoUsd {
        let cached = self.cached.min(self.prompt);
        (self.prompt - cached)
            .saturating_mul(rates.input)
            .saturating_add(cached.saturating_mul(rates.cached_input))
            .saturating_add(self.completion.saturating_mul(rates.output))
    }
}

/// Spend by model over each current calendar period of a workspace
/// (today, this month), following its calendar counters: a period the
/// counters moved past starts empty. A model has one entry with a column per
/// period (`None` where it was not called), so that a call finds its model
/// once for all periods: every settlement adds to the book, and each search
/// reads the model names it passes, cache lines a cold call pays for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendBook {
    /// The start of the period each column counts from.
    starts: [Timestamp; Period::ALL.len()],
    /// How many models each column keeps apart (see
    /// [`MAX_MODELS_PER_PERIOD`]).
    kept: [usize; Period::ALL.len()],
    models: BTreeMap<Model, PerPeriod>,
}

/// A model's spend in each period, indexed by [`Period::index`].
type PerPeriod = [Option<ModelSpend>; Period::ALL.len()];

impl SpendBook {
    /// Adds a call of `model` finished (or charged) at `at` to every
    /// current period that holds `at`. A call that named no model cost
    /// nothing and has no price to compare: it is left out.
    pub fn add(&mut self, calendars: &Calendars, at: Timestamp, model: &Model, spend: ModelSpend) {
        let mut charged = [false; Period::ALL.len()];
        for period in Period::ALL {
            let counter = calendars.get(period);
            if self.starts[period.index()] != counter.start {
                self.start_afresh(period, counter.start);
            }
            charged[period.index()] = counter.contains(at);
        }
        // A model every charged period keeps already, the common case, is
        // found once and its name not copied.
        if let Some(columns) = self.models.get_mut(model)
            && charged
                .iter()
                .zip(columns.iter())
                .all(|(charged, column)| !charged || column.is_some())
        {
            for (column, _) in columns.iter_mut().zip(charged).filter(|(_, c)| *c) {
                *column.get_or_insert_default() += spend;
            }
            return;
        }
        for period in Period::ALL.into_iter().filter(|p| charged[p.index()]) {
            let index = period.index();
            let kept_already = self
                .models
                .get(model)
                .is_some_and(|columns| columns[index].is_some());
            let name = if kept_already || self.kept[index] < MAX_MODELS_PER_PERIOD {
                model.clone()
            } else {
                Model::from(super::model::OTHER_MODELS)
            };
            let column = &mut self.models.entry(name).or_default()[index];
            if column.is_none() {
                self.kept[index] += 1;
            }
            *column.get_or_insert_default() += spend;
        }
    }

    /// Empties `period`'s column for the period starting at `start`.
    fn start_afresh(&mut self, period: Period, start: Timestamp) {
        let index = period.index();
        self.starts[index] = start;
        self.kept[index] = 0;
        self.models.retain(|_, columns| {
            columns[index] = None;
            columns.iter().any(Option::is_some)
        });
    }

    /// Spend by model in the current `period` (as `calendars` bound it),
    /// by model name.
    pub fn period(&self, calendars: &Calendars, period: Period) -> BTreeMap<Model, ModelSpend> {
        let index = period.index();
        if self.starts[index] != calendars.get(period).start {
            return BTreeMap::new();
        }
        self.models
            .iter()
            .filter_map(|(model, columns)| Some((model.clone(), columns[index]?)))
            .collect()
    }

    /// Forgets everything (a reset of the workspace's usage).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Suffixes that name a smaller, cheaper size of the same model
/// (`gpt-4o-mini` of `gpt-4o`, `gpt-5-nano` of `gpt-5`).
const SMALLER_SIZES: [&str; 2] = ["mini", "nano"];

/// A cheaper model for a workload, priced on its own token mix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheaperModel {
    /// The model the workload spent most on, as its calls named it.
    pub from: Model,
    /// The cheaper model, as the price table names it.
    pub to: String,
    /// What `from`'s calls were charged in the period.
    pub spent: NanoUsd,
    /// What `from`'s token mix costs at `from`'s and at `to`'s standard
    /// rates, in pico-dollars.
    pub cost_from: PicoUsd,
    pub cost_to: PicoUsd,
}

impl CheaperModel {
    /// `to`'s cost as a share of `from`'s for this mix, as texts write it:
    /// whole percent, or "under 1%".
    pub fn share(&self) -> String {
        let percent = (self.cost_to as f64 * 100.0 / self.cost_from as f64).round();
        if percent < 1.0 {
            "under 1%".to_owned()
        } else {
            format!("{percent}%")
        }
    }

    /// What `from`'s calls would have been charged at `to`'s rates, in
    /// nano-dollars: the spend scaled by the share, so that surcharges
    /// (priority tier, long prompts) scale alike.
    pub fn would_have_spent(&self) -> NanoUsd {
        let scaled = u128::from(self.spent) * u128::from(self.cost_to) / u128::from(self.cost_from);
        NanoUsd::try_from(scaled).unwrap_or(NanoUsd::MAX)
    }
}

/// The cheaper model to suggest for a workload that spent `by_model`, at
/// `prices`: for the model the workload spent most on (among those the
/// table prices), its smaller sizes of the same mode (`-mini`, `-nano`
/// after the name the table prices it under: `gpt-4o` → `gpt-4o-mini`;
/// `gpt-5` → `gpt-5-mini`, `gpt-5-nano`), priced at their standard rates
/// on that model's own token mix (uncached input, cached input and output
/// tokens); the cheapest of them, if it costs less than the model itself.
/// Smaller sizes of the same model are the ones that can usually take over
/// its work as it is; a model of another family or mode (an embedding
/// model for a chat workload) would not, however cheap.
pub fn cheaper_model(
    prices: &PriceTable,
    by_model: &BTreeMap<Model, ModelSpend>,
) -> Option<CheaperModel> {
    let (model, spend, priced_as, price) = by_model
        .iter()
        .filter_map(|(model, spend)| {
            let (priced_as, price) = prices.resolve(model)?;
            Some((model, spend, priced_as, price))
        })
        .max_by(|a, b| a.1.usd.cmp(&b.1.usd).then_with(|| b.0.cmp(a.0)))?;
    let cost_from = spend.cost_at(price.standard());
    if cost_from == 0 {
        return None;
    }
    let (to, cost_to) = SMALLER_SIZES
        .iter()
        .filter_map(|size| {
            let name = format!("{priced_as}-{size}");
            let (_, smaller) = prices.resolve(&name)?;
            (smaller.mode == price.mode).then(|| (name, spend.cost_at(smaller.standard())))
        })
        .min_by_key(|(_, cost)| *cost)?;
    (cost_to < cost_from).then(|| CheaperModel {
        from: model.clone(),
        to,
        spent: spend.usd,
        cost_from,
        cost_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::price::Price;
    use crate::domain::price::tests::rates;

    fn table() -> PriceTable {
        let mut models = BTreeMap::new();
        let mut add = |name: &str, mode: &str, rates: Rates| {
            models.insert(name.to_owned(), Price::new(mode, rates));
        };
        add("gpt-4o", "chat", rates(2.5, 1.25, 10.0));
        add("gpt-4o-mini", "chat", rates(0.15, 0.075, 0.6));
        add("gpt-5", "chat", rates(1.25, 0.125, 10.0));
        add("gpt-5-mini", "chat", rates(0.25, 0.025, 2.0));
        add("gpt-5-nano", "chat", rates(0.05, 0.005, 0.4));
        add("o3", "chat", rates(2.0, 0.5, 8.0));
        // A smaller size that costs more for output-heavy work.
        add("o3-mini", "chat", rates(1.1, 0.55, 4.4));
        add("text-embedding-3", "embedding", rates(0.1, 0.1, 0.0));
        add("text-embedding-3-mini", "chat", rates(0.01, 0.01, 0.0));
        PriceTable::new("2026-12-02", models)
    }

    /// What `by_model` spent in all.
    fn total(by_model: &BTreeMap<Model, ModelSpend>) -> NanoUsd {
        by_model.values().map(|spend| spend.usd).sum()
    }

    fn spend(prompt: u64, cached: u64, completion: u64, usd: NanoUsd) -> ModelSpend {
        ModelSpend {
            prompt,
            cached,
            completion,
            usd,
        }
    }

    fn book(entries: &[(&str, ModelSpend)]) -> BTreeMap<Model, ModelSpend> {
        entries
            .iter()
            .map(|(model, spend)| (Model::from(*model), *spend))
            .collect()
    }

    #[test]
    fn the_model_spent_most_on_is_compared_with_its_cheapest_smaller_size() {
        // 1M uncached input, 0 cached, 100k output of gpt-4o: $2.50 + $1.00.
        let by_model = book(&[
            (
                "gpt-4o-2024-08-06",
                spend(1_000_000, 0, 100_000, 3_500_000_000),
            ),
            ("gpt-5", spend(10_000, 0, 0, 12_500_000)),
        ]);
        let cheaper = cheaper_model(&table(), &by_model).expect("a cheaper model");
        assert_eq!(cheaper.from.as_ref(), "gpt-4o-2024-08-06");
        assert_eq!(cheaper.to, "gpt-4o-mini");
        assert_eq!(cheaper.cost_from, 3_500_000_000_000);
        // $0.15 + $0.06 = $0.21: 6% of $3.50.
        assert_eq!(cheaper.cost_to, 210_000_000_000);
        assert_eq!(cheaper.share(), "6%");
        assert_eq!(cheaper.would_have_spent(), 210_000_000);
    }

    #[test]
    fn the_share_follows_the_workloads_own_token_mix() {
        // Mostly cached input: gpt-5-nano is the cheapest smaller size.
        let cached_heavy = book(&[("gpt-5", spend(1_000_000, 900_000, 10_000, 1))]);
        let cheaper = cheaper_model(&table(), &cached_heavy).expect("cheaper");
        assert_eq!(cheaper.to, "gpt-5-nano");
        // 100k × 1.25 + 900k × 0.125 + 10k × 10 = $0.3375;
        // 100k × 0.05 + 900k × 0.005 + 10k × 0.4 = $0.0135: 4%.
        assert_eq!(cheaper.cost_from, 337_500_000_000);
        assert_eq!(cheaper.cost_to, 13_500_000_000);
        assert_eq!(cheaper.share(), "4%");
    }

    #[test]
    fn no_suggestion_without_a_cheaper_smaller_size_of_the_same_mode() {
        let table = table();
        // gpt-4o-mini has no smaller size.
        assert_eq!(
            cheaper_model(&table, &book(&[("gpt-4o-mini", spend(1000, 0, 1000, 5))])),
            None
        );
        // o3-mini costs less for uncached input and output but more for
        // cached input: for a workload of cached input only it is no
        // cheaper (1M cached tokens: $0.55 against $0.50).
        assert_eq!(
            cheaper_model(&table, &book(&[("o3", spend(1_000_000, 1_000_000, 0, 5))])),
            None
        );
        // A smaller size of another mode is not a replacement.
        assert_eq!(
            cheaper_model(
                &table,
                &book(&[("text-embedding-3", spend(1_000_000, 0, 0, 5))])
            ),
            None
        );
        // Unpriced models and nothing spent suggest nothing.
        assert_eq!(
            cheaper_model(&table, &book(&[("acme-llm", spend(1000, 0, 1000, 5))])),
            None
        );
        assert_eq!(cheaper_model(&table, &BTreeMap::new()), None);
    }

    #[test]
    fn a_tiny_share_reads_as_under_one_percent() {
        let cheaper = CheaperModel {
            from: Model::from("a"),
            to: "b".to_owned(),
            spent: 1_000,
            cost_from: 1_000,
            cost_to: 4,
        };
        assert_eq!(cheaper.share(), "under 1%");
        assert_eq!(cheaper.would_have_spent(), 4);
    }

    #[test]
    fn the_book_follows_the_calendar_periods() {
        let tz = chrono_tz::UTC;
        let at = |text: &str| {
            Timestamp::from_millis(
                chrono::DateTime::parse_from_rfc3339(text)
                    .expect("RFC 3339")
                    .timestamp_millis(),
            )
        };
        let mut calendars = Calendars::new(at("2026-12-02T10:00:00Z"), tz);
        let mut book = SpendBook::default();
        let mini = Model::from("gpt-4o-mini");
        book.add(
            &calendars,
            at("2026-12-02T10:00:00Z"),
            &mini,
            spend(10, 0, 5, 100),
        );
        book.add(
            &calendars,
            at("2026-12-02T11:00:00Z"),
            &mini,
            spend(10, 2, 5, 100),
        );
        // Charged yesterday, in this month: the month counts it, today not.
        book.add(
            &calendars,
            at("2026-12-01T23:00:00Z"),
            &mini,
            spend(1, 0, 0, 7),
        );
        assert_eq!(
            book.period(&calendars, Period::Day)[&mini],
            spend(20, 2, 10, 200)
        );
        assert_eq!(book.period(&calendars, Period::Month)[&mini].usd, 207);
        calendars.roll(at("2026-12-03T00:00:01Z"), tz);
        assert!(book.period(&calendars, Period::Day).is_empty(), "a new day");
        assert_eq!(total(&book.period(&calendars, Period::Month)), 207);
        book.add(
            &calendars,
            at("2026-12-03T00:00:01Z"),
            &mini,
            spend(1, 0, 0, 1),
        );
        assert_eq!(total(&book.period(&calendars, Period::Day)), 1);
        assert_eq!(total(&book.period(&calendars, Period::Month)), 208);
    }

    #[test]
    fn a_period_keeps_a_bounded_number_of_models() {
        let now = Timestamp::from_millis(1_000);
        let calendars = Calendars::new(now, chrono_tz::UTC);
        let mut book = SpendBook::default();
        for i in 0..MAX_MODELS_PER_PERIOD + 5 {
            book.add(
                &calendars,
                now,
                &Model::from(format!("m{i}")),
                spend(0, 0, 0, 1),
            );
        }
        let day = book.period(&calendars, Period::Day);
        assert_eq!(day.len(), MAX_MODELS_PER_PERIOD + 1);
        assert_eq!(day[&Model::from(super::super::model::OTHER_MODELS)].usd, 5);
        assert_eq!(total(&day), MAX_MODELS_PER_PERIOD as u64 + 5);
    }

    #[test]
    fn each_period_bounds_its_models_on_its_own() {
        let tz = chrono_tz::UTC;
        // 2 December 2026, 10:00 UTC, and the day before.
        let now = Timestamp::from_millis(1_796_205_600_000);
        let yesterday = Timestamp::from_millis(now.millis() - 86_400_000);
        let calendars = Calendars::new(now, tz);
        let mut book = SpendBook::default();
        for i in 0..MAX_MODELS_PER_PERIOD {
            book.add(
                &calendars,
                yesterday,
                &Model::from(format!("m{i}")),
                spend(0, 0, 0, 1),
            );
        }
        let late = Model::from("late");
        book.add(&calendars, now, &late, spend(0, 0, 0, 10));
        book.add(&calendars, now, &late, spend(0, 0, 0, 10));
        let day = book.period(&calendars, Period::Day);
        assert_eq!(day.len(), 1, "today has room: {day:?}");
        assert_eq!(day[&late].usd, 20);
        let month = book.period(&calendars, Period::Month);
        assert_eq!(month.len(), MAX_MODELS_PER_PERIOD + 1);
        assert!(!month.contains_key(&late), "the month is full");
        assert_eq!(
            month[&Model::from(super::super::model::OTHER_MODELS)].usd,
            20
        );
    }
}
