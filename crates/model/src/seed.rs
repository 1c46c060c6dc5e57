//! Seeded random initialisation through libtorch's process-global generator.
//!
//! `tch::manual_seed` followed by initialisers is only reproducible when nothing else draws from
//! the global generator in between; tests run in parallel threads, so every seeded construction
//! holds one process-wide lock while it seeds and draws, and so does every unseeded construction
//! (a model built before its weights are loaded draws its throw-away initial values there too).

use std::sync::{Mutex, PoisonError};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// Seeds the global generator with `seed` and runs `init` while no other seeded construction of
/// this crate can draw from it.
pub fn with_global_seed<T>(seed: i64, init: impl FnOnce() -> T) -> T {
    let _held = GLOBAL_GENERATOR
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    tch::manual_seed(seed);
    init()
}

/// Runs `init`, which draws from the global generator without caring about its values, while no
/// seeded construction can be disturbed by it.
pub(crate) fn without_seed<T>(init: impl FnOnce() -> T) -> T {
    let _held = GLOBAL_GENERATOR
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    init()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn seeded_draws_repeat_while_other_threads_seed_and_draw() {
        let draw = || with_global_seed(3, || Tensor::randn([64], (Kind::Float, Device::Cpu)));
        let first = draw();
        let noise = std::thread::spawn(|| {
            for seed in 0..2000 {
                let _ = with_global_seed(seed, || Tensor::randn([8], (Kind::Float, Device::Cpu)));
            }
        });
        for _ in 0..50 {
            assert!(draw().equal(&first));
        }
        noise.join().unwrap();
    }
}
