//! Compiles tiktoken's vocabularies into compact tables at build time, for
//! `src/proxy/vocabulary.rs`. Building tiktoken-rs's own encoder takes about
//! 45 MiB and a quarter of a second per encoding; doing it here, once, means
//! the server only ever holds the compact form. Each table is two files in
//! `OUT_DIR`: `NAME.bytes`, every ordinary token's bytes back to back in rank
//! order, and `NAME.starts`, where each rank's bytes start (little-endian
//! u32, one more entry marking the end). A rank without an ordinary token (a
//! gap, or a special token) is empty.

use std::path::Path;

use tiktoken_rs::{CoreBPE, Rank};

/// After this many ranks in a row that do not decode, the vocabulary has ended.
const RANK_GAP_AT_END: usize = 1024;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let out = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let encodings = [
        ("o200k_base", tiktoken_rs::o200k_base()),
        ("cl100k_base", tiktoken_rs::cl100k_base()),
        ("p50k_base", tiktoken_rs::p50k_base()),
        ("r50k_base", tiktoken_rs::r50k_base()),
    ];
    for (name, core) in encodings {
        let core = core.unwrap_or_else(|error| panic!("tiktoken-rs cannot load {name}: {error}"));
        let (bytes, starts) = table(&core);
        let out = Path::new(&out);
        std::fs::write(out.join(format!("{name}.bytes")), bytes).expect("write the table");
        std::fs::write(out.join(format!("{name}.starts")), starts).expect("write the table");
    }
}

fn table(core: &CoreBPE) -> (Vec<u8>, Vec<u8>) {
    let special: Vec<Rank> = core
        .special_tokens()
        .into_iter()
        .flat_map(|token| core.encode_with_special_tokens(token))
        .collect();
    let mut bytes = Vec::new();
    let mut starts = vec![0u32];
    let mut missing_in_a_row = 0;
    let mut rank: Rank = 0;
    while missing_in_a_row < RANK_GAP_AT_END {
        match core.decode_bytes(&[rank]) {
            Ok(token) if !special.contains(&rank) => {
                missing_in_a_row = 0;
                bytes.extend_from_slice(&token);
            }
            _ => missing_in_a_row += 1,
        }
        starts.push(u32::try_from(bytes.len()).expect("a vocabulary under 4 GiB"));
        rank += 1;
    }
    // The trailing run of missing ranks holds nothing.
    starts.truncate(starts.len() - RANK_GAP_AT_END);
    let starts = starts
        .iter()
        .flat_map(|start| start.to_le_bytes())
        .collect();
    (bytes, starts)
}
