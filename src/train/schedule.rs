//! The learning-rate schedule of MAE fine-tuning (facebookresearch/mae `util/lr_sched.py`),
//! per optimiser step: linear warm-up to the peak lr, then a half-cosine down to `min_lr`.
//! The peak is `base_lr × effective batch / 256` ([`crate::Config::lr`]), computed by the caller.

/// Peak lr, floor, warm-up length and total length, all in optimiser steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The lr of optimiser step `step` (0-based).
    ///
    /// 1. warm-up: `peak × (step + 1) / warmup` — MAE's `epoch / warmup` counted at the end of the
    ///    step, so the first step does not run at lr 0;
    /// 2. cosine: `min + (peak − min) × ½(1 + cos(π · progress))`, progress 0 → 1 over the rest;
    /// 3. past the end: `min_lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
