//! Splitting text into the pieces tiktoken merges, as its patterns split it,
//! without a backtracking engine.
//!
//! tiktoken splits with a regular expression that a finite automaton cannot
//! run as written: possessive quantifiers (`\p{L}++`) and one lookahead,
//! `\s+(?!\S)` (a run of whitespace, less its last character when a
//! non-space follows). Run by a backtracking engine this costs some 1,500
//! instructions per token, more than the rest of the proxy's work on a call.
//! Here each pattern is written as its alternatives in order, for a lazy DFA
//! that keeps the order's priority (leftmost-first, as backtracking does):
//!
//! - A possessive quantifier becomes a greedy one. In these patterns what
//!   follows a possessive run can never match a character the run gave back
//!   (`\p{L}++` ends its alternative, `[^\s\p{L}\p{N}]++` is followed by
//!   `[\r\n]`, `\s++` by the end of the text), so giving back never finds a
//!   match the possessive form refuses, and greedy takes the same run.
//! - `\s+(?!\S)` becomes `\s+\s`, and its match loses its last character
//!   unless it ends the text. Both match at the same places but for one: a
//!   single whitespace character at the end of the text, which the
//!   lookahead matches and `\s+\s` does not; the alternatives after it (`\s`
//!   or `\s+`) then match that same character, so the piece is the same.
//!   Where both match a run of two or more characters, the lookahead gives
//!   the whole run at the end of the text and all but its last character
//!   elsewhere, which is what the trimming leaves.
//!
//! Every character matches some alternative of each pattern (a letter the
//! letter ones, a digit the digit one, whitespace the last one, anything
//! else the punctuation one), so each search is anchored where the previous
//! piece ended and the DFA never looks for a later start. The tests check
//! the pieces against tiktoken's patterns on random text.

use regex_automata::meta::{BuildError, Regex};
use regex_automata::{Anchored, Input, PatternID};

/// A tiktoken pattern as alternatives in the order it tries them.
pub struct Pattern {
    alternatives: &'static [&'static str],
    /// The alternative written `\s+\s` for tiktoken's `\s+(?!\S)`.
    lookahead: usize,
}

/// o200k_base's pattern.
pub const O200K: Pattern = Pattern {
    alternatives: &[
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+\s",
        r"\s+",
    ],
    lookahead: 5,
};

/// cl100k_base's pattern.
pub const CL100K: Pattern = Pattern {
    alternatives: &[
        r"'(?i:[sdmt]|ll|ve|re)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s+$",
        r"\s*[\r\n]",
        r"\s+\s",
        r"\s",
    ],
    lookahead: 6,
};

/// GPT-2's pattern, which p50k_base and r50k_base split with.
pub const GPT2: Pattern = Pattern {
    alternatives: &[
        r"'(?:[sdmt]|ll|ve|re)",
        r" ?\p{L}+",
        r" ?\p{N}+",
        r" ?[^\s\p{L}\p{N}]+",
        r"\s+$",
        r"\s+\s",
        r"\s",
    ],
    lookahead: 5,
};

pub struct Pretokenizer {
    regex: Regex,
    lookahead: PatternID,
}

impl Pretokenizer {
    pub fn new(pattern: &Pattern) -> Result<Self, Box<BuildError>> {
        Ok(Self {
            regex: Regex::new_many(pattern.alternatives).map_err(Box::new)?,
            lookahead: PatternID::new(pattern.lookahead).expect("a small pattern index"),
        })
    }

    /// The pieces of `text`, in order, as tiktoken's pattern finds them.
    pub fn pieces<'t>(&self, text: &'t str) -> impl Iterator<Item = &'t str> + use<'t, '_> {
        let mut start = 0;
        std::iter::from_fn(move || {
            let input = Input::new(text)
                .range(start..)
                .anchored(Anchored::Yes)
                .earliest(false);
            let found = self.regex.search(&input)?;
            let mut end = found.end();
            if found.pattern() == self.lookahead && end < text.len() {
                end = text[..end]
                    .char_indices()
                    .next_back()
                    .map_or(end, |(last, _)| last);
            }
            start = end;
            Some(&text[found.start()..end])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;

    use proptest::prelude::*;

    /// tiktoken's own patterns, run by the engine tiktoken runs them on.
    const CL100K_REFERENCE: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
    const GPT2_REFERENCE: &str =
        r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

    /// Fragments that stress every alternative's edges: ASCII, whitespace of
    /// every kind, contractions in both cases (and the long s and Kelvin
    /// sign, which fold to s and k), letters of each case category, marks,
    /// other scripts' digits, emoji, and runs.
    const FRAGMENTS: &[&str] = &[
        "a",
        "Z",
        "q",
        "s",
        "S",
        "0",
        "7",
        "123",
        "4567",
        ".",
        ",",
        "!",
        "/",
        "-",
        "_",
        "\"",
        "'",
        "'s",
        "'S",
        "'d",
        "'D",
        "'m",
        "'M",
        "'t",
        "'T",
        "'ll",
        "'LL",
        "'Ll",
        "'ve",
        "'VE",
        "'re",
        "'RE",
        "'ſ",
        "'\u{212A}",
        " ",
        "  ",
        "\t",
        "\r",
        "\n",
        "\r\n",
        "\u{A0}",
        "\u{2003}",
        "\u{3000}",
        "\u{85}",
        "\u{1C5}",
        "\u{2B0}",
        "\u{1D2C}",
        "中",
        "文",
        "日本",
        "\u{301}",
        "e\u{301}",
        "\u{663}",
        "\u{664}\u{665}",
        "\u{2167}",
        "½",
        "🚀",
        "👩‍👧",
        "\u{200D}",
        "\u{FE0F}",
        "É",
        "ß",
        "ǅa",
        "ا",
        "ñ",
        "Ω",
        "      ",
        "\n\n\n",
        " \n ",
        "aaaaaaaaaaaa",
        "999999",
        "!!!!!!",
        "\t \t",
        "\u{3000}\u{3000}",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40)
            .prop_map(|fragments| fragments.concat())
    }

    /// Each pattern with its reference, built once for all cases.
    struct Case {
        pretokenizer: Pretokenizer,
        reference: fancy_regex::Regex,
    }

    impl Case {
        fn new(pattern: &Pattern, reference: &str) -> Self {
            Self {
                pretokenizer: Pretokenizer::new(pattern).expect("pattern"),
                reference: fancy_regex::Regex::new(reference).expect("tiktoken's pattern"),
            }
        }

        fn check(&self, text: &str) -> Result<(), TestCaseError> {
            let expected: Vec<&str> = self
                .reference
                .find_iter(text)
                .map(|piece| piece.expect("no backtracking limit").as_str())
                .collect();
            let pieces: Vec<&str> = self.pretokenizer.pieces(text).collect();
            prop_assert_eq!(pieces, expected, "{:?}", text);
            Ok(())
        }
    }

    static O200K_CASE: LazyLock<Case> =
        LazyLock::new(|| Case::new(&O200K, tiktoken_rs::O200K_BASE_PAT_STR));
    static CL100K_CASE: LazyLock<Case> = LazyLock::new(|| Case::new(&CL100K, CL100K_REFERENCE));
    static GPT2_CASE: LazyLock<Case> = LazyLock::new(|| Case::new(&GPT2, GPT2_REFERENCE));

    proptest! {
        #[test]
        fn o200k_splits_as_tiktoken(text in text()) {
            O200K_CASE.check(&text)?;
        }

        #[test]
        fn cl100k_splits_as_tiktoken(text in text()) {
            CL100K_CASE.check(&text)?;
        }

        #[test]
        fn gpt2_splits_as_tiktoken(text in text()) {
            GPT2_CASE.check(&text)?;
        }
    }

    #[test]
    fn whitespace_before_a_word_leaves_its_last_character_to_the_word() {
        let pretokenizer = Pretokenizer::new(&O200K).expect("pattern");
        let pieces: Vec<&str> = pretokenizer.pieces("a \u{3000}\u{3000}b   ").collect();
        assert_eq!(pieces, ["a", " \u{3000}", "\u{3000}b", "   "]);
    }
}
