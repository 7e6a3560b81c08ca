//! Stop strings over streamed text: text is released only once it cannot be the start of a stop string, so a
//! client never sees part of a stop string, and the stop string itself is never emitted.

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Keep going; this text is safe to emit (possibly empty).
    Continue(String),
    /// A stop string was found: emit this text (what preceded it), then finish.
    Stop(String),
}

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text held back because it ends with a prefix of some stop string.
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(delta.to_string());
        }
        self.held.push_str(delta);
        // `held` never contains a whole stop string before this push, so the earliest match is the right cut.
        if let Some(cut) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..cut].to_string();
            self.held.clear();
            return StopCheck::Stop(out);
        }
        let keep = self.stops.iter().map(|s| partial_suffix(&self.held, s)).max().unwrap_or(0);
        let release = self.held.len() - keep;
        let out = self.held[..release].to_string();
        self.held.drain(..release);
        StopCheck::Continue(out)
    }

    /// The held text, when generation ends for another reason (it was not a stop string after all).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with (cut at char boundaries).
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().filter(|&k| stop.is_char_boundary(k)).find(|&k| text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(s) => out.push(s),
                StopCheck::Stop(s) => return (push(out, s), true, String::new()),
            }
        }
        let rest = m.flush();
        (out, false, rest)
    }

    fn push(mut v: Vec<String>, s: String) -> Vec<String> {
        v.push(s);
        v
    }

    #[test]
    fn holds_back_partial_matches_and_cuts_at_the_stop() {
        // "END" arrives split over three pieces; "E" and "EN" are held, never shown.
        let (out, stopped, _) = run(&["END"], &["ab", "cE", "N", "Dxyz"]);
        assert!(stopped);
        assert_eq!(out, vec!["ab", "c", "", ""]);
        // A false start is released once it cannot be a stop any more.
        let (out, stopped, rest) = run(&["END"], &["aE", "Nb", "E"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "ENb", ""]);
        assert_eq!(rest, "E");
        // The earliest of several stops wins; the stop itself is never emitted.
        let (out, stopped, _) = run(&["yy", "x"], &["abxcyy"]);
        assert!(stopped);
        assert_eq!(out.concat(), "ab");
        // No stops: everything passes through.
        assert_eq!(run(&[], &["a", "b"]).0, vec!["a", "b"]);
        assert_eq!(run(&[""], &["a"]).0, vec!["a"]);
        // Multi-byte stop strings are cut at char boundaries.
        let (out, stopped, _) = run(&["é!"], &["café", "!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
    }
}
