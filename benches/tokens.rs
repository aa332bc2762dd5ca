//! The cost of counting a prompt's tokens as the proxy does for every call
//! (`Vocabulary::count` with o200k_base), on texts of four kinds.
//!
//! `cargo bench --bench tokens` prints the time per count; divide by the
//! tokens each text has (printed once before the runs) for the cost of one.

use quotawatch::proxy::vocabulary::{O200K_BASE, Vocabulary};
use std::sync::LazyLock;

static VOCABULARY: LazyLock<Vocabulary> =
    LazyLock::new(|| Vocabulary::new(&O200K_BASE).expect("o200k_base"));

/// English prose, code, CJK and whitespace-heavy text of about 2,000 tokens
/// each (the CJK text fewer).
static TEXTS: LazyLock<[(&str, String); 4]> = LazyLock::new(|| {
    let prose = include_str!("../ARCHITECTURE.md")
        .chars()
        .take(9_000)
        .collect();
    let code = include_str!("../src/proxy/estimate.rs")
        .chars()
        .take(7_000)
        .collect();
    let cjk = "日本語のテキストは、単語の間に空白を置かずに書かれます。中文文本同样没有空格，模型需要把每个字切分成若干字节再合并。한국어 텍스트는 띄어쓰기를 사용합니다. "
        .repeat(20);
    let whitespace = (0..200)
        .map(|line| {
            format!(
                "{}\"key_{line}\": [{line}, null],\r\n",
                " ".repeat(4 * (line % 7))
            )
        })
        .collect();
    [
        ("prose", prose),
        ("code", code),
        ("cjk", cjk),
        ("whitespace", whitespace),
    ]
});

fn main() {
    for (name, text) in TEXTS.iter() {
        println!("{name}: {} tokens", VOCABULARY.count(text));
    }
    divan::main();
}

#[divan::bench(args = ["prose", "code", "cjk", "whitespace"])]
fn count(bencher: divan::Bencher, name: &str) {
    let text = &TEXTS
        .iter()
        .find(|(text, _)| *text == name)
        .expect("a text")
        .1;
    bencher.bench(|| VOCABULARY.count(divan::black_box(text)));
}
