//! Model names as clients send them, and the bound on how many of them a
//! workspace keeps in history.
//!
//! A model name travels from a request into history rows and metrics
//! labels, so it is the one free-form string a client can make quotawatch
//! store. Two rules keep that bounded: a name must be short and plain
//! ([`parse_model`]), and each workspace keeps at most
//! [`MAX_MODELS_PER_DAY`] names per local day ([`DailyModels`]); calls of
//! further models are kept under [`OTHER_MODELS`].

use std::collections::HashSet;

use chrono_tz::Tz;

use super::time::{Timestamp, day_bounds};
use super::workspace::Model;

/// The longest model name accepted, in characters. OpenAI's longest names
/// (fine-tuned models, `ft:BASE:ORG:SUFFIX:ID`) stay well below it.
pub const MAX_MODEL_NAME: usize = 100;

/// How many distinct model names one workspace keeps in history per local
/// day. Calls of any further model that day count under [`OTHER_MODELS`].
pub const MAX_MODELS_PER_DAY: usize = 50;

/// The name under which calls beyond [`MAX_MODELS_PER_DAY`] are kept.
pub const OTHER_MODELS: &str = "other";

/// Why a model name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidModel {
    #[error("model must not be empty")]
    Empty,
    #[error("model is {0} characters long; at most {MAX_MODEL_NAME} are accepted")]
    TooLong(usize),
    #[error(
        "model contains {0:?}; only ASCII letters, digits and the characters . _ - : / @ are accepted"
    )]
    Character(char),
}

/// Whether `c` may appear in a model name: what OpenAI's names (including
/// fine-tuned ones), Azure deployment names and `provider/model` routes use.
fn is_model_character(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@')
}

/// Validates a model name as a client sent it: 1 to [`MAX_MODEL_NAME`]
/// characters among ASCII letters, digits and `. _ - : / @`. The REST API
/// and the proxy both accept a model name only through this function, so a
/// name in history or in a metrics label always satisfies it.
pub fn parse_model(name: &str) -> Result<Model, InvalidModel> {
    if name.is_empty() {
        return Err(InvalidModel::Empty);
    }
    if let Some(c) = name.chars().find(|c| !is_model_character(*c)) {
        return Err(InvalidModel::Character(c));
    }
    // Every accepted character is ASCII, so bytes are characters here.
    if name.len() > MAX_MODEL_NAME {
        return Err(InvalidModel::TooLong(name.len()));
    }
    Ok(Model::from(name))
}

/// One local day of a workspace and the model names it keeps.
#[derive(Debug)]
struct Day {
    start: Timestamp,
    end: Timestamp,
    /// `None` stands for calls that named no model: they take a row too.
    names: HashSet<Option<Model>>,
}

/// The model names a workspace keeps in history for its current and its
/// previous local day (a call is recorded at the time it was admitted,
/// which may be in the day before). Older days are forgotten.
#[derive(Debug, Default)]
pub struct DailyModels {
    /// Newest last; at most two.
    days: Vec<Day>,
}

impl DailyModels {
    /// The name under which a call of `model` at `at` is kept: the model
    /// itself while its day keeps fewer than [`MAX_MODELS_PER_DAY`] names or
    /// already keeps this one, [`OTHER_MODELS`] otherwise (and for days
    /// older than the two kept).
    pub fn name(&mut self, model: Option<Model>, at: Timestamp, tz: Tz) -> Option<Model> {
        let Some(day) = self.day(at, tz) else {
            return Some(Model::from(OTHER_MODELS));
        };
        if day.names.contains(&model) {
            return model;
        }
        if day.names.len() < MAX_MODELS_PER_DAY {
            day.names.insert(model.clone());
            return model;
        }
        Some(Model::from(OTHER_MODELS))
    }

    /// The kept day containing `at`, opening it when it is newer than all
    /// kept days; `None` when it is older.
    fn day(&mut self, at: Timestamp, tz: Tz) -> Option<&mut Day> {
        if let Some(index) = self
            .days
            .iter()
            .position(|day| day.start <= at && at < day.end)
        {
            return Some(&mut self.days[index]);
        }
        if self.days.last().is_some_and(|newest| at < newest.start) {
            return None;
        }
        let (start, end) = day_bounds(at, tz);
        if self.days.len() == 2 {
            self.days.remove(0);
        }
        self.days.push(Day {
            start,
            end,
            names: HashSet::new(),
        });
        self.days.last_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_short_names_are_accepted_and_others_refused_with_the_reason() {
        for name in [
            "gpt-4o-mini",
            "o3",
            "ft:gpt-4o-mini-2024-07-18:acme:support:9xYz",
            "openai/gpt-4.1",
            "my_deployment@eu",
            &"x".repeat(MAX_MODEL_NAME),
        ] {
            assert_eq!(parse_model(name).as_deref(), Ok(name));
        }
        assert_eq!(parse_model(""), Err(InvalidModel::Empty));
        assert_eq!(
            parse_model(&"x".repeat(MAX_MODEL_NAME + 1)),
            Err(InvalidModel::TooLong(MAX_MODEL_NAME + 1))
        );
        for (name, c) in [
            ("gpt 4o", ' '),
            ("gpt\u{0}", '\u{0}'),
            ("gpt-4o\n", '\n'),
            ("modèle", 'è'),
            ("a\"b", '"'),
        ] {
            assert_eq!(parse_model(name), Err(InvalidModel::Character(c)));
        }
    }

    const T0: Timestamp = Timestamp::from_millis(1_780_000_000_000);
    const DAY_MS: i64 = 86_400_000;

    fn model(name: &str) -> Option<Model> {
        Some(Model::from(name))
    }

    #[test]
    fn a_day_keeps_the_first_names_and_the_rest_go_to_other() {
        let mut models = DailyModels::default();
        let tz = Tz::UTC;
        let other = model(OTHER_MODELS);
        assert_eq!(models.name(None, T0, tz), None);
        for i in 1..MAX_MODELS_PER_DAY {
            let name = model(&format!("m{i}"));
            assert_eq!(models.name(name.clone(), T0, tz), name);
        }
        assert_eq!(models.name(model("late"), T0, tz), other);
        assert_eq!(models.name(model("m1"), T0, tz), model("m1"));
        assert_eq!(models.name(None, T0, tz), None);

        // The next day starts afresh; the previous one still keeps its names
        // for calls admitted before midnight and settled after.
        let tomorrow = Timestamp::from_millis(T0.millis() + DAY_MS);
        assert_eq!(models.name(model("late"), tomorrow, tz), model("late"));
        assert_eq!(models.name(model("late"), T0, tz), other);
        assert_eq!(models.name(model("m2"), T0, tz), model("m2"));

        // Two days later, the first day is forgotten: its calls go to other.
        let after = Timestamp::from_millis(T0.millis() + 2 * DAY_MS);
        assert_eq!(models.name(model("m3"), after, tz), model("m3"));
        assert_eq!(models.name(model("m2"), T0, tz), other);
    }
}
