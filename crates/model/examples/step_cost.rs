//! Times one batched AR decode step (forward and output head) of 1, 2, 4 and 8 sessions (CFG: 2
//! rows each) spread over the grid, with the model of a directory, fp32 on one CPU thread:
//! `cargo run --release -p mulo-model --example step_cost -- models/emoji/target`.
//! `N=8` runs one size, `REPS` sets the repetitions, `INPUT_MAJOR=1` lays the weights out as
//! serving does ([`Gpt::use_input_major_weights`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use mulo_model::{BatchInput, DType, Gpt};
use tch::{Device, Tensor};

fn main() {
    tch::set_num_threads(1);
    let dir = std::env::args().nth(1).expect("model dir");
    let (mut m, _) = Gpt::load(std::path::Path::new(&dir), Device::Cpu, Some(DType::Fp32)).unwrap();
    if std::env::var("INPUT_MAJOR").is_ok() {
        m.use_input_major_weights();
    }
    let cls = m.config().cls_token_num;
    let grid = m.config().grid.len() as i64;
    let only: Option<i64> = std::env::var("N").ok().and_then(|v| v.parse().ok());
    for n in [1i64, 2, 4, 8]
        .into_iter()
        .filter(|n| only.is_none_or(|o| o == *n))
    {
        let mut cache = m.new_cache(2 * n, cls + grid).unwrap();
        tch::no_grad(|| {
            let groups = |m: &Gpt| -> Vec<BatchInput> {
                (0..n)
                    .map(|i| BatchInput {
                        x: m.embed_tokens(&[5], 2).unwrap(),
                        rows: vec![2 * i, 2 * i + 1],
                        positions: vec![cls + (grid - 1) * (2 * i + 1) / (2 * n)],
                        mask: None,
                    })
                    .collect()
            };
            let run = |cache: &mut _| {
                let hs = m.forward_batch(&groups(&m), cache).unwrap();
                let h = Tensor::cat(&hs.iter().map(|h| h.select(1, 0)).collect::<Vec<_>>(), 0);
                m.head(&h)
            };
            for _ in 0..20 {
                let _ = run(&mut cache);
            }
            let reps = std::env::var("REPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            let t = Instant::now();
            for _ in 0..reps {
                let _ = run(&mut cache);
            }
            let per = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "sessions {n}: {:.3} ms per step ({:.3} ms per session)",
                per * 1e3,
                per * 1e3 / n as f64
            );
        });
    }
}
