//! Stop sequences over streamed text.
//!
//! Text arrives in pieces that can split a stop sequence anywhere, so the matcher holds back
//! the longest tail that could still grow into one. Invariant: the concatenation of everything
//! it returns is the whole text cut where the first stop sequence to complete begins, however
//! the text was split. "First to complete" matters only when stops overlap: with stops `é` and
//! `字é!`, the text `字é!` is cut before `é`, because generation would have halted there.

/// Finds stop sequences in text fed to it piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet returned: always shorter than the longest stop sequence.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop sequences are ignored (request parsing already refuses them).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds newly decoded text. Returns the text that is now safe to emit and whether a stop
    /// sequence was found; the stop sequence and everything after it are never returned, and
    /// once stopped every later call returns `("", true)`.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(delta);
        if let Some(at) = self.first_stop() {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep_from = self.partial_stop_start();
        let rest = self.held.split_off(keep_from);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// At the end of the stream: whatever was held back (nothing once stopped).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop sequence has been seen.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Where the first stop sequence to complete in the held text begins: the occurrence that
    /// ends first, the longest of those that end together. Ranking by end, not start, is what
    /// makes the result independent of how the text was split: generation halts as soon as a
    /// stop completes, so a longer stop that began earlier but would end later never counts.
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at + s.len(), at)))
            .min()
            .map(|(_, at)| at)
    }

    /// Where the longest held tail that is a proper prefix of some stop sequence begins (the
    /// held text's length when there is none).
    fn partial_stop_start(&self) -> usize {
        let held = self.held.as_str();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let first_candidate = held.len().saturating_sub(longest.saturating_sub(1));
        (first_candidate..held.len())
            .filter(|&i| held.is_char_boundary(i))
            .find(|&i| {
                let tail = &held[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(held.len())
    }
}
