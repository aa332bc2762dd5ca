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
//! Most pieces of prose and code are an ASCII word or number, which each
//! pattern's `ascii` function finds by hand when the byte after it settles
//! where it ends (an ASCII byte that no alternative could take further); a
//! DFA search costs some 500 instructions a piece on prose, however short
//! the piece, and a scan of its bytes a tenth of that.
//! Anything else, and every piece the bytes leave open, goes to the DFA.
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
    /// The length of the piece at the start of the bytes when it is an
    /// ASCII word or number whose end is settled; `None` leaves it to the
    /// DFA.
    ascii: fn(&[u8]) -> Option<usize>,
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
    ascii: o200k_ascii,
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
    ascii: cl100k_ascii,
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
    ascii: gpt2_ascii,
};

/// o200k_base's first two alternatives on an ASCII word: one ASCII byte
/// that is neither alphanumeric nor a line break, then uppercase letters and
/// lowercase ones (the first alternative, when there are lowercase ones) or
/// uppercase letters alone (the second). An apostrophe after may begin a
/// contraction, and a byte beyond ASCII may be a letter or mark: both are
/// left open. ASCII digits are its third alternative.
fn o200k_ascii(bytes: &[u8]) -> Option<usize> {
    let first = *bytes.first()?;
    if first.is_ascii_digit() {
        return digits(bytes, 0, 3);
    }
    let start = usize::from(
        first.is_ascii() && !first.is_ascii_alphanumeric() && !matches!(first, b'\r' | b'\n'),
    );
    let upper = start + ascii_run(&bytes[start..], u8::is_ascii_uppercase);
    let end = upper + ascii_run(&bytes[upper..], u8::is_ascii_lowercase);
    if end == start {
        return None;
    }
    settled(bytes, end, |next| next == b'\'')
}

/// cl100k_base's second alternative on an ASCII word: one ASCII byte that is
/// neither alphanumeric, a line break nor an apostrophe (which may begin the
/// first alternative, a contraction), then letters. ASCII digits are its
/// third alternative.
fn cl100k_ascii(bytes: &[u8]) -> Option<usize> {
    let first = *bytes.first()?;
    if first.is_ascii_digit() {
        return digits(bytes, 0, 3);
    }
    let start = usize::from(
        first.is_ascii()
            && !first.is_ascii_alphanumeric()
            && !matches!(first, b'\r' | b'\n' | b'\''),
    );
    let end = start + ascii_run(&bytes[start..], u8::is_ascii_alphabetic);
    if end == start {
        return None;
    }
    settled(bytes, end, |_| false)
}

/// GPT-2's letters and digits alternatives: an optional space, then ASCII
/// letters, or ASCII digits without a bound.
fn gpt2_ascii(bytes: &[u8]) -> Option<usize> {
    let start = usize::from(bytes.first() == Some(&b' '));
    if bytes.get(start).is_some_and(u8::is_ascii_digit) {
        return digits(bytes, start, usize::MAX);
    }
    let end = start + ascii_run(&bytes[start..], u8::is_ascii_alphabetic);
    if end == start {
        return None;
    }
    settled(bytes, end, |_| false)
}

/// Up to `most` digits from `start`: ASCII ones are settled by the byte
/// after them, unless it is beyond ASCII (another script's digit).
fn digits(bytes: &[u8], start: usize, most: usize) -> Option<usize> {
    let count = ascii_run(&bytes[start..], u8::is_ascii_digit).min(most);
    if count == most {
        return Some(start + count);
    }
    settled(bytes, start + count, |_| false)
}

fn ascii_run(bytes: &[u8], member: fn(&u8) -> bool) -> usize {
    bytes.iter().take_while(|byte| member(byte)).count()
}

/// `end`, when the text ends there or its byte is ASCII and cannot go on
/// the piece; `None` when only the DFA can tell.
fn settled(bytes: &[u8], end: usize, continues: fn(u8) -> bool) -> Option<usize> {
    match bytes.get(end) {
        None => Some(end),
        Some(&next) if next.is_ascii() && !continues(next) => Some(end),
        Some(_) => None,
    }
}

pub struct Pretokenizer {
    regex: Regex,
    lookahead: PatternID,
    ascii: fn(&[u8]) -> Option<usize>,
}

impl Pretokenizer {
    pub fn new(pattern: &Pattern) -> Result<Self, Box<BuildError>> {
        Ok(Self {
            regex: Regex::new_many(pattern.alternatives).map_err(Box::new)?,
            lookahead: PatternID::new(pattern.lookahead).expect("a small pattern index"),
            ascii: pattern.ascii,
        })
    }

    /// The pieces of `text`, in order, as tiktoken's pattern finds them.
    pub fn pieces<'t>(&self, text: &'t str) -> impl Iterator<Item = &'t str> + use<'t, '_> {
        let mut start = 0;
        std::iter::from_fn(move || {
            if let Some(length) = (self.ascii)(&text.as_bytes()[start..]) {
                let piece = &text[start..start + length];
                start += length;
                return Some(piece);
            }
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
        "hello",
        "The",
        "I",
        "x_y",
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

    /// Texts whose splitting a slip in the lookahead's trimming or in the
    /// ASCII shortcuts gets wrong: a contraction after a long word, another
    /// script's digit after an ASCII one, whitespace runs around a word.
    #[test]
    fn edges_split_as_tiktoken() {
        for text in [
            "\t \t",
            "aaaaaaaaaaaa's",
            "0\u{663}",
            "HTTPServer's 12\u{663}4",
            "x \n\t y",
        ] {
            for case in [&*O200K_CASE, &*CL100K_CASE, &*GPT2_CASE] {
                case.check(text).expect("the same pieces");
            }
        }
    }

    #[test]
    fn whitespace_before_a_word_leaves_its_last_character_to_the_word() {
        let pretokenizer = Pretokenizer::new(&O200K).expect("pattern");
        let pieces: Vec<&str> = pretokenizer.pieces("a \u{3000}\u{3000}b   ").collect();
        assert_eq!(pieces, ["a", " \u{3000}", "\u{3000}b", "   "]);
    }
}
