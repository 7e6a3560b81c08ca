//! Token choice from one row of logits: penalties, then greedy or temperature sampling with top-k, min-p and
//! top-p, drawn from a per-request [`SplitMix64`].
//!
//! Order (documented because implementations differ): repetition penalty (HF/llama.cpp: positive logits divided,
//! negative multiplied, over every token of prompt and output), presence and frequency penalties (OpenAI:
//! `logit − count·frequency − (count > 0)·presence`, over output tokens), then temperature 0 → argmax; otherwise
//! top-k, softmax at the temperature, min-p (drop tokens below `min_p · p_max`), top-p (smallest prefix of the
//! sorted tokens whose mass reaches `top_p`), and one draw. Every buffer is sized when the request starts, so
//! [`Sampler::sample`] does not allocate.

use crate::rng::SplitMix64;

/// Sampling knobs of one request. The defaults are OpenAI's (temperature 1, nothing else on).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 0 means off.
    pub min_p: f32,
    /// 1 means off.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The same seed (and request) gives the same tokens; `None` draws a fresh one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// The first knob out of range, as (field name, what is wrong).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let fin = |name: &'static str, v: f32| {
            if v.is_finite() { Ok(()) } else { Err((name, format!("must be a finite number, got {v}"))) }
        };
        fin("temperature", self.temperature)?;
        fin("top_p", self.top_p)?;
        fin("min_p", self.min_p)?;
        fin("repetition_penalty", self.repetition_penalty)?;
        fin("presence_penalty", self.presence_penalty)?;
        fin("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(("temperature", format!("must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(("repetition_penalty", format!("must be > 0, got {}", self.repetition_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(("presence_penalty", format!("must be in [-2, 2], got {}", self.presence_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(("frequency_penalty", format!("must be in [-2, 2], got {}", self.frequency_penalty)));
        }
        Ok(())
    }

    fn greedy(&self) -> bool {
        self.temperature <= 1e-6 || self.top_k == 1
    }
}

/// Per-request sampler state: the knobs, the RNG, token counts for penalties and a candidate buffer.
pub struct Sampler {
    p: SamplingParams,
    rng: SplitMix64,
    /// Per vocabulary id: times generated (for presence/frequency).
    generated: Vec<u32>,
    /// Per vocabulary id: seen in prompt or output (for the repetition penalty).
    seen: Vec<bool>,
    /// The distinct ids with `seen` set, so penalties cost O(distinct) and not O(vocab) per token.
    touched: Vec<u32>,
    /// (id, logit, then probability) candidates.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// `max_new` bounds the output length, so `touched` never grows past its first allocation.
    pub fn new(params: SamplingParams, vocab: usize, prompt: &[u32], max_new: usize) -> Self {
        let seed = params.seed.unwrap_or_else(crate::rng::fresh_seed);
        let mut s = Sampler {
            p: params,
            rng: SplitMix64::new(seed),
            generated: vec![0; vocab],
            seen: vec![false; vocab],
            touched: Vec::with_capacity((prompt.len() + max_new).min(vocab)),
            cand: Vec::with_capacity(vocab),
        };
        for &t in prompt {
            s.mark_seen(t);
        }
        s
    }

    fn mark_seen(&mut self, t: u32) {
        if let Some(f) = self.seen.get_mut(t as usize)
            && !*f
        {
            *f = true;
            self.touched.push(t);
        }
    }

    /// Record a token the request emitted (it then counts for every penalty).
    pub fn accept(&mut self, t: u32) {
        self.mark_seen(t);
        if let Some(c) = self.generated.get_mut(t as usize) {
            *c += 1;
        }
    }

    /// Choose the next token. `logits` is modified in place by the penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        if self.p.greedy() {
            return argmax(logits);
        }
        self.cand.clear();
        self.cand.extend(
            logits.iter().enumerate().map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l })),
        );
        // Descending by logit (or probability: the map is monotonic), ties by id, so the order (and the draw) is
        // deterministic.
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.p.top_k;
        if k > 0 && k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, desc);
            self.cand.truncate(k);
            self.cand.sort_unstable_by(desc);
        }
        let max = self.cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.p.temperature;
        let mut total = 0.0f64;
        for c in self.cand.iter_mut() {
            c.1 = ((c.1 - max) * inv_t).exp();
            total += c.1 as f64;
        }
        if self.p.min_p > 0.0 {
            // The top token has probability exp(0) = 1 before normalisation, so `min_p · p_max` is `min_p`.
            let floor = self.p.min_p;
            self.cand.retain(|c| c.1 >= floor);
            total = self.cand.iter().map(|c| c.1 as f64).sum();
        }
        if self.p.top_p < 1.0 {
            let want = self.p.top_p as f64 * total;
            // The nucleus is usually a few tokens of a 150k vocabulary: sort only a growing top slice until its
            // mass reaches `want`, instead of sorting everything every token.
            let n = self.cand.len();
            let mut m = 64.min(n);
            let keep = loop {
                if m < n && k == 0 {
                    self.cand.select_nth_unstable_by(m - 1, desc);
                }
                self.cand[..m].sort_unstable_by(desc);
                let mut acc = 0.0f64;
                let found = self.cand[..m].iter().position(|c| {
                    acc += c.1 as f64;
                    acc >= want
                });
                match found {
                    Some(i) => break (i + 1, acc),
                    None if m == n => break (n, acc),
                    None => m = (m * 4).min(n),
                }
            };
            self.cand.truncate(keep.0.max(1));
            total = keep.1.min(total);
        }
        let mut u = self.rng.next_f64() * total;
        for c in &self.cand {
            u -= c.1 as f64;
            if u < 0.0 {
                return c.0;
            }
        }
        // Rounding left a sliver of mass: the last candidate takes it.
        self.cand.last().map_or_else(|| argmax(logits), |c| c.0)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let r = self.p.repetition_penalty;
        let (pres, freq) = (self.p.presence_penalty, self.p.frequency_penalty);
        if r == 1.0 && pres == 0.0 && freq == 0.0 {
            return;
        }
        for &t in &self.touched {
            let Some(l) = logits.get_mut(t as usize) else { continue };
            if r != 1.0 {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
            let c = self.generated[t as usize];
            if c > 0 {
                *l -= c as f32 * freq + pres;
            }
        }
    }
}

/// Index of the largest logit (the first on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits where token 3 is best, 1 second, 0 third; the rest low.
    fn logits() -> Vec<f32> {
        vec![2.0, 2.5, -1.0, 3.0, 0.5, -3.0, 1.0, 0.0]
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(1), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    /// The set of tokens drawn in `n` single-step samples with fresh seeds 0..n.
    fn support(p: &SamplingParams, n: u64) -> std::collections::BTreeSet<u32> {
        (0..n)
            .map(|s| {
                let mut smp = Sampler::new(SamplingParams { seed: Some(s), ..p.clone() }, 8, &[], 1);
                smp.sample(&mut logits())
            })
            .collect()
    }

    #[test]
    fn greedy_is_argmax() {
        for seed in 0..20 {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 0.0;
                    p.seed = Some(seed)
                }),
                8,
                &[],
                4,
            );
            assert_eq!(s.sample(&mut logits()), 3);
        }
        assert_eq!(argmax(&logits()), 3);
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
        // top_k 1 is greedy at any temperature.
        assert_eq!(support(&params(|p| p.top_k = 1), 50), [3].into());
    }

    #[test]
    fn temperature_spreads_and_top_k_limits() {
        let all = support(&params(|p| p.temperature = 5.0), 400);
        assert!(all.len() >= 7, "{all:?}");
        assert_eq!(
            support(
                &params(|p| {
                    p.temperature = 5.0;
                    p.top_k = 2
                }),
                200
            ),
            [1, 3].into()
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // At T=1, p(3) ≈ 0.44, p(1) ≈ 0.27, p(0) ≈ 0.16: top_p 0.5 keeps {3, 1}.
        assert_eq!(support(&params(|p| p.top_p = 0.5), 200), [1, 3].into());
        assert_eq!(support(&params(|p| p.top_p = 0.3), 100), [3].into());
        // min_p 0.5: keep p >= 0.5·p(3): token 1 (e^-0.5 ≈ 0.61) stays, token 0 (e^-1 ≈ 0.37) goes.
        assert_eq!(support(&params(|p| p.min_p = 0.5), 200), [1, 3].into());
    }

    #[test]
    fn top_p_over_a_large_vocabulary_grows_its_slice() {
        // Logits falling with the id: the nucleus is a prefix of ids, thousands long (past the first 64-token slice).
        let v = 5000;
        let base: Vec<f32> = (0..v).map(|i| -(i as f32) * 0.0002).collect();
        let probs: Vec<f64> = base.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let nucleus = probs.iter().position(|p| {
            acc += p;
            acc >= 0.5 * total
        });
        let nucleus = nucleus.unwrap() + 1;
        assert!(nucleus > 1000);
        let mut max_seen = 0;
        for seed in 0..300 {
            let mut s = Sampler::new(SamplingParams { top_p: 0.5, seed: Some(seed), ..Default::default() }, v, &[], 1);
            let t = s.sample(&mut base.clone()) as usize;
            assert!(t < nucleus + 1, "token {t} is outside the nucleus of {nucleus}");
            max_seen = max_seen.max(t);
        }
        // Draws spread over the nucleus, not only its first slice.
        assert!(max_seen > nucleus / 2, "{max_seen} of {nucleus}");
    }

    #[test]
    fn penalties_move_the_argmax() {
        let greedy = |f: &dyn Fn(&mut SamplingParams), prompt: &[u32], out: &[u32]| {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 0.0;
                    f(p)
                }),
                8,
                prompt,
                8,
            );
            out.iter().for_each(|&t| s.accept(t));
            s.sample(&mut logits())
        };
        // Repetition: 3.0/2 = 1.5 < 2.5, over prompt tokens too.
        assert_eq!(greedy(&|p| p.repetition_penalty = 2.0, &[3], &[]), 1);
        assert_eq!(greedy(&|p| p.repetition_penalty = 2.0, &[], &[]), 3);
        // Presence counts output tokens once: 3 − 1 = 2.0 < 2.5.
        assert_eq!(greedy(&|p| p.presence_penalty = 1.0, &[3], &[]), 3);
        assert_eq!(greedy(&|p| p.presence_penalty = 1.0, &[], &[3]), 1);
        // Frequency scales with the count: 3 − 0.3 = 2.7 (still best), 3 − 0.9 = 2.1 (not).
        assert_eq!(greedy(&|p| p.frequency_penalty = 0.3, &[], &[3]), 3);
        assert_eq!(greedy(&|p| p.frequency_penalty = 0.3, &[], &[3, 3, 3]), 1);
        // A negative logit gets more negative under repetition penalty.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0), 8, &[2], 1);
        let mut l = logits();
        s.apply_penalties(&mut l);
        assert_eq!(l[2], -2.0);
        let _ = s.sample(&mut l);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 3.0;
                    p.seed = Some(seed)
                }),
                8,
                &[],
                64,
            );
            (0..64).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        // 64 draws over ≥ 7 plausible tokens: two seeds agreeing everywhere has probability far below 1e-20.
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn validate_names_the_field() {
        assert!(SamplingParams::default().validate().is_ok());
        assert_eq!(params(|p| p.temperature = -1.0).validate().unwrap_err().0, "temperature");
        assert_eq!(params(|p| p.top_p = 0.0).validate().unwrap_err().0, "top_p");
        assert_eq!(params(|p| p.min_p = 2.0).validate().unwrap_err().0, "min_p");
        assert_eq!(params(|p| p.repetition_penalty = 0.0).validate().unwrap_err().0, "repetition_penalty");
        assert_eq!(params(|p| p.presence_penalty = 3.0).validate().unwrap_err().0, "presence_penalty");
        assert_eq!(params(|p| p.frequency_penalty = f32::NAN).validate().unwrap_err().0, "frequency_penalty");
    }
}
