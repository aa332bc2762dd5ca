//! Counting tokens with a compact copy of a tiktoken vocabulary.
//!
//! tiktoken-rs's `CoreBPE` keeps its vocabulary three times over (an
//! encoder map, a decoder map and a sorted list, each with one allocation
//! per token): about 45 MiB for o200k_base, and as much again while it is
//! built. Counting needs only the rank of a byte string, so the build script
//! (`build.rs`) turns each vocabulary into a [`Table`] compiled into the
//! binary, every token's bytes back to back with the offset of each rank,
//! and a [`Vocabulary`] adds a hash index of ranks: about 4 MiB in all.
//!
//! Counting follows tiktoken's `encode_ordinary` step by step: the text is
//! split into the pieces the encoding's own pattern finds (by
//! [`Pretokenizer`], without tiktoken's backtracking engine), a piece that is a token counts
//! one, and any other piece is merged pair by pair, lowest rank first, until
//! no pair is a token. The counts are the same (see the tests).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use regex_automata::meta::BuildError;
use rustc_hash::FxBuildHasher;

use super::pretokenizer::{self, Pattern, Pretokenizer};

type Rank = u32;

/// One encoding's vocabulary as the build script wrote it, and the pattern
/// that splits text before merging.
pub struct Table {
    bytes: &'static [u8],
    /// Little-endian u32 offsets into `bytes`, one per rank and one more.
    starts: &'static [u8],
    pattern: &'static Pattern,
}

macro_rules! table {
    ($name:literal, $pattern:expr) => {
        Table {
            bytes: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bytes")),
            starts: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".starts")),
            pattern: $pattern,
        }
    };
}

/// o200k_base, and o200k_harmony, which differs only in special tokens.
pub const O200K_BASE: Table = table!("o200k_base", &pretokenizer::O200K);
pub const CL100K_BASE: Table = table!("cl100k_base", &pretokenizer::CL100K);
/// The pre-tokenizer of p50k_base and r50k_base is GPT-2's.
pub const P50K_BASE: Table = table!("p50k_base", &pretokenizer::GPT2);
pub const R50K_BASE: Table = table!("r50k_base", &pretokenizer::GPT2);

pub struct Vocabulary {
    bytes: &'static [u8],
    /// Where each rank's bytes start in `bytes`; one more entry marks the
    /// end. A rank with no ordinary token (a gap, or a special token) is
    /// empty.
    starts: Box<[u32]>,
    /// The ranks, found by the hash of their bytes.
    index: HashTable<Rank>,
    pretokenizer: Pretokenizer,
}

impl Vocabulary {
    /// Indexes `table`; this takes a few milliseconds.
    pub fn new(table: &Table) -> Result<Self, Box<BuildError>> {
        let starts: Box<[u32]> = table
            .starts
            .chunks_exact(4)
            .map(|start| u32::from_le_bytes([start[0], start[1], start[2], start[3]]))
            .collect();
        let mut vocabulary = Self {
            bytes: table.bytes,
            starts,
            index: HashTable::new(),
            pretokenizer: Pretokenizer::new(table.pattern)?,
        };
        let ranks = vocabulary.starts.len().saturating_sub(1);
        let mut index = HashTable::with_capacity(ranks);
        for rank in 0..ranks as Rank {
            let token = vocabulary.token(rank);
            if !token.is_empty() {
                index.insert_unique(hash(token), rank, |rank| hash(vocabulary.token(*rank)));
            }
        }
        vocabulary.index = index;
        Ok(vocabulary)
    }

    fn token(&self, rank: Rank) -> &[u8] {
        let rank = rank as usize;
        &self.bytes[self.starts[rank] as usize..self.starts[rank + 1] as usize]
    }

    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        self.index
            .find(hash(bytes), |rank| self.token(*rank) == bytes)
            .copied()
    }

    /// The number of tokens in `text`, as `CoreBPE::encode_ordinary` counts.
    pub fn count(&self, text: &str) -> usize {
        self.pretokenizer
            .pieces(text)
            .map(|piece| self.count_piece(piece.as_bytes()))
            .sum()
    }

    fn count_piece(&self, piece: &[u8]) -> usize {
        if self.rank(piece).is_some() {
            1
        } else {
            self.merged_parts(piece)
        }
    }

    /// How many tokens byte-pair merging leaves of `piece`: starting from
    /// single bytes, the adjacent pair with the lowest rank (the leftmost
    /// among equals) is joined while any pair is a token. A heap keeps this
    /// at O(n log n), so long pieces (runs of spaces) stay cheap.
    fn merged_parts(&self, piece: &[u8]) -> usize {
        let len = piece.len();
        // Parts are named by where they start. `end[s]` is where part `s`
        // ends, `before[s]` where the part before it starts, and `pair[s]`
        // the rank of part `s` joined with the next one (MAX: not a token,
        // or `s` is no longer a part).
        let mut end: Vec<usize> = (1..=len).collect();
        let mut before: Vec<Option<usize>> = (0..len).map(|s| s.checked_sub(1)).collect();
        let pair_rank = |end: &[usize], s: usize| -> Rank {
            let next = end[s];
            if next >= len {
                return Rank::MAX;
            }
            self.rank(&piece[s..end[next]]).unwrap_or(Rank::MAX)
        };
        let mut pair: Vec<Rank> = (0..len).map(|s| pair_rank(&end, s)).collect();
        let mut heap: BinaryHeap<Reverse<(Rank, usize)>> = pair
            .iter()
            .enumerate()
            .filter(|(_, rank)| **rank != Rank::MAX)
            .map(|(s, rank)| Reverse((*rank, s)))
            .collect();
        let mut parts = len;
        while let Some(Reverse((rank, s))) = heap.pop() {
            // Entries are not removed when a merge changes a pair; they are
            // skipped here instead. Equal ranks mean equal bytes, so an
            // entry whose rank still matches is the current pair.
            if pair[s] != rank {
                continue;
            }
            let right = end[s];
            end[s] = end[right];
            pair[right] = Rank::MAX;
            if end[s] < len {
                before[end[s]] = Some(s);
            }
            parts -= 1;
            for changed in [Some(s), before[s]].into_iter().flatten() {
                pair[changed] = pair_rank(&end, changed);
                if pair[changed] != Rank::MAX {
                    heap.push(Reverse((pair[changed], changed)));
                }
            }
        }
        parts
    }
}

fn hash(bytes: &[u8]) -> u64 {
    FxBuildHasher.hash_one(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiktoken_rs::CoreBPE;

    /// Texts of many kinds: prose, code, numbers, whitespace runs,
    /// contractions, other scripts, emoji, and special tokens as plain text.
    const SAMPLES: &[&str] = &[
        "Hello there!",
        "Be brief.",
        "",
        " ",
        "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? We'll see; they've gone.",
        "fn main() {\n    let x: Vec<u32> = (0..100).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
        "Numbers: 3.14159265358979 1234567890 -42 1e10 0x1F 2026-11-27T23:59:59Z",
        "Indented\n\n\n        deeply\t\ttabbed   \r\n  trailing   ",
        "日本語のテキストと中文文本，还有한국어 텍스트.",
        "Emoji 👩‍👩‍👧‍👦 and 🚀🚀🚀 with accents: café, naïve, Øresund, ÀÉÎÕÜ.",
        "<|endoftext|> is text here, as are <|fim_prefix|> and <|endofprompt|>.",
        "SHOUTING WORDS AND MiXeD CaSe: HTTPServer XMLHttpRequest iPhone McDonald's",
        "==================================================== ---------- ******",
        "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCB0ZXh0IGZvciB0ZXN0aW5nIHB1cnBvc2Vz",
        "https://example.com/path/to/resource?query=value&other=123#fragment",
        "{\"role\": \"user\", \"content\": \"What's the weather like in Paris today?\"}",
    ];

    fn check(core: &CoreBPE, table: &Table, name: &str) {
        let vocabulary = Vocabulary::new(table).expect("vocabulary");
        let long_spaces = " ".repeat(300);
        let long_word = "supercalifragilisticexpialidocious".repeat(3);
        for text in SAMPLES
            .iter()
            .copied()
            .chain([long_spaces.as_str(), long_word.as_str()])
        {
            assert_eq!(
                vocabulary.count(text),
                core.encode_ordinary(text).len(),
                "{name}: {text:?}"
            );
        }
    }

    /// What a hostile tenant might send to be charged fewer tokens than
    /// the upstream will bill: long runs of one class of character, and the
    /// boundaries the pre-tokenizer decides by hand (contractions, other
    /// scripts' digits and letters after ASCII, marks, line breaks).
    #[test]
    fn hostile_texts_count_as_tiktoken_counts_them() {
        let texts = [
            format!("{}x", " ".repeat(2_000)),
            format!("{}\n", " \t".repeat(1_000)),
            format!("e{}", "\u{301}".repeat(1_000)),
            "'s'LL'Ve".repeat(300),
            "ABCdef'S".repeat(300),
            "aaaaaaaaaaaa's don't HELLO'LL ".repeat(200),
            "123\u{663}".repeat(300),
            "word\u{A0}Wörd\u{3000}字".repeat(300),
            "\r\n \r\n".repeat(500),
            "\u{1F468}\u{200D}\u{1F469}\0".repeat(300),
            "a".repeat(3_000),
        ];
        for (core, table, name) in [
            (
                tiktoken_rs::o200k_base().expect("o200k"),
                &O200K_BASE,
                "o200k_base",
            ),
            (
                tiktoken_rs::cl100k_base().expect("cl100k"),
                &CL100K_BASE,
                "cl100k_base",
            ),
        ] {
            let vocabulary = Vocabulary::new(table).expect("vocabulary");
            for text in &texts {
                assert_eq!(
                    vocabulary.count(text),
                    core.encode_ordinary(text).len(),
                    "{name}: {:?}…",
                    &text.chars().take(20).collect::<String>()
                );
            }
        }
    }

    #[test]
    fn counts_match_tiktoken_for_every_encoding() {
        check(
            &tiktoken_rs::o200k_base().expect("o200k"),
            &O200K_BASE,
            "o200k_base",
        );
        check(
            &tiktoken_rs::cl100k_base().expect("cl100k"),
            &CL100K_BASE,
            "cl100k_base",
        );
        check(
            &tiktoken_rs::p50k_base().expect("p50k"),
            &P50K_BASE,
            "p50k_base",
        );
        check(
            &tiktoken_rs::r50k_base().expect("r50k"),
            &R50K_BASE,
            "r50k_base",
        );
    }

    #[test]
    fn counts_match_tiktoken_on_random_text() {
        use rand::{RngExt, SeedableRng};
        const ALPHABET: &[&str] = &[
            "a", "e", "t", "s", "T", "Q", "z", "'s", "'ll", " ", "  ", "\n", "\t", "\r\n", "0",
            "7", "42", ".", ",", "!", "?", "-", "=", "(", ")", "{", "\"", "é", "ß", "中", "文",
            "🚀", "ا", "ñ",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (core, table) in [
            (tiktoken_rs::o200k_base().expect("o200k"), &O200K_BASE),
            (tiktoken_rs::cl100k_base().expect("cl100k"), &CL100K_BASE),
        ] {
            let vocabulary = Vocabulary::new(table).expect("vocabulary");
            for _ in 0..300 {
                let length = rng.random_range(1..80);
                let text: String = (0..length)
                    .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                    .collect();
                assert_eq!(
                    vocabulary.count(&text),
                    core.encode_ordinary(&text).len(),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn every_ordinary_token_is_copied_and_special_ones_are_not() {
        let core = tiktoken_rs::o200k_base().expect("o200k");
        let vocabulary = Vocabulary::new(&O200K_BASE).expect("vocabulary");
        for rank in [0, 1, 255, 1000, 100_000, 199_997] {
            let token = core.decode_bytes(&[rank]).expect("a token");
            assert_eq!(vocabulary.rank(&token), Some(rank));
        }
        assert_eq!(vocabulary.rank(b"<|endoftext|>"), None);
    }
}
