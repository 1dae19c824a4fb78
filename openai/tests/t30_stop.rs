//! Stop sequences: however the text is split, the output is the text cut at the first stop.

use pd_openai::StopMatcher;

/// A small deterministic generator, so that every run checks the same cases.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn stops(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What the matcher must produce: the text up to the start of the first stop occurrence to
/// complete (the earliest end; the longest among those ending together).
fn expected(text: &str, stops: &[String]) -> (String, bool) {
    let first = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|at| (at + s.len(), at)))
        .min();
    match first {
        Some((_, at)) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// Feeds `pieces` and returns the concatenated output and whether it stopped.
fn run(stops: &[String], pieces: &[&str]) -> (String, bool) {
    let mut matcher = StopMatcher::new(stops);
    let mut out = String::new();
    let mut stopped = false;
    for piece in pieces {
        let (emitted, hit) = matcher.push(piece);
        assert!(!stopped || emitted.is_empty(), "text after the stop");
        out.push_str(&emitted);
        stopped |= hit;
    }
    out.push_str(&matcher.finish());
    (out, stopped)
}

/// Splits `text` at the char boundaries in `cuts`.
fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        pieces.push(&text[start..cut]);
        start = cut;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Every way to split short texts into pieces (each gap cut or not) gives the expected output.
#[test]
fn every_split_of_short_texts() {
    let stop_sets = [
        stops(&["ab"]),
        stops(&["aab", "b\n"]),
        stops(&["ééx", "xé"]),
        stops(&["abcabd"]),
        stops(&["</s>", "<|eot|>"]),
    ];
    let texts = [
        "aaab",
        "xaabab\nb",
        "ééé xé",
        "abcabcabd",
        "hello <|eo <|eot|> after </s>",
        "no stop at all",
        "",
        "ab",
    ];
    for stops in &stop_sets {
        for text in texts {
            let boundaries: Vec<usize> = (1..text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            let splits = 1u32 << boundaries.len().min(12);
            for mask in 0..splits {
                let cuts: Vec<usize> = boundaries
                    .iter()
                    .enumerate()
                    .filter(|(bit, _)| mask & (1 << bit) != 0)
                    .map(|(_, &cut)| cut)
                    .collect();
                let pieces = split(text, &cuts);
                assert_eq!(
                    run(stops, &pieces),
                    expected(text, stops),
                    "stops {stops:?}, pieces {pieces:?}"
                );
            }
        }
    }
}

/// Random texts over a small alphabet (multi-byte chars included), random stops, random splits.
#[test]
fn random_texts_and_splits() {
    let alphabet = ['a', 'b', 'é', '\n', '字', '<'];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let random_string = |rng: &mut XorShift, len_max: usize, len_min: usize| -> String {
        let len = len_min + rng.below(len_max - len_min + 1);
        (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect()
    };
    for _ in 0..5_000 {
        let stops: Vec<String> = (0..1 + rng.below(4))
            .map(|_| random_string(&mut rng, 4, 1))
            .collect();
        let text = random_string(&mut rng, 40, 0);
        let boundaries: Vec<usize> = (1..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        let mut cuts: Vec<usize> = boundaries
            .into_iter()
            .filter(|_| rng.below(3) == 0)
            .collect();
        cuts.dedup();
        let pieces = split(&text, &cuts);
        assert_eq!(
            run(&stops, &pieces),
            expected(&text, &stops),
            "stops {stops:?}, pieces {pieces:?}"
        );
    }
}

/// Overlapping stops: the one that completes first wins, even if another began earlier.
#[test]
fn overlapping_stops_cut_at_the_first_to_complete() {
    let nested = stops(&["é", "字é!"]);
    assert_eq!(run(&nested, &["a字é!"]), ("a字".to_string(), true));
    assert_eq!(run(&nested, &["a字", "é", "!"]), ("a字".to_string(), true));
    // Two stops ending at the same place: the longer one, which began earlier, is cut.
    let same_end = stops(&["bc", "abc"]);
    assert_eq!(run(&same_end, &["xabc"]), ("x".to_string(), true));
}

/// Text that cannot start a stop sequence is released at once, not held.
#[test]
fn releases_what_cannot_be_a_stop() {
    let mut matcher = StopMatcher::new(&stops(&["STOP"]));
    assert_eq!(matcher.push("hello "), ("hello ".to_string(), false));
    assert_eq!(matcher.push("wor ST"), ("wor ".to_string(), false));
    assert_eq!(matcher.push("ART"), ("START".to_string(), false));
    assert_eq!(matcher.push("x STO"), ("x ".to_string(), false));
    assert_eq!(matcher.push("P and more"), (String::new(), true));
    assert!(matcher.is_stopped());
    assert_eq!(matcher.push("later"), (String::new(), true));
    assert_eq!(matcher.finish(), "");
}

/// Without stops, everything passes through; empty stops are ignored.
#[test]
fn no_stops() {
    let mut matcher = StopMatcher::new(&stops(&[""]));
    assert_eq!(matcher.push("a"), ("a".to_string(), false));
    assert_eq!(matcher.push(""), (String::new(), false));
    assert_eq!(matcher.finish(), "");
}

/// At the end of the stream, a held partial stop is text after all.
#[test]
fn finish_releases_held_text() {
    let mut matcher = StopMatcher::new(&stops(&["</s>"]));
    assert_eq!(matcher.push("end</"), ("end".to_string(), false));
    assert_eq!(matcher.finish(), "</");
}
