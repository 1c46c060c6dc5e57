//! Tiny random models for the engine tests (CPU, fp32, seeded).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use mulo_core::{Condition, GridSize, SamplingParams};
use mulo_engine::drafter::DrafterCore;
use mulo_engine::verifier::VerifierCore;
use mulo_engine::{Engine, SessionRef, SessionSpec};
use mulo_model::config::{ConditionConfig, PositionEmbedding};
use mulo_model::{DType, Gpt, GptConfig, Upsampler, UpsamplerConfig, VqConfig, VqModel};
use tch::{Device, Tensor};

pub const V: i64 = 16;

pub fn gpt(grid: GridSize, vocab: i64, layers: i64, seed: i64) -> Gpt {
    let cfg = GptConfig {
        name: None,
        dim: 32,
        n_layer: layers,
        n_head: 2,
        n_kv_head: None,
        multiple_of: 16,
        ffn_dim_multiplier: None,
        ffn_hidden: None,
        norm_eps: 1e-5,
        rope_base: 10000.0,
        vocab_size: vocab,
        condition: ConditionConfig::Class { num_classes: 3 },
        cls_token_num: 1,
        grid,
        position_embedding: PositionEmbedding::Rope2d,
        dtype: DType::Fp32,
        caption_vocab: None,
        sampling: None,
        vq: None,
    };
    Gpt::random(cfg, Device::Cpu, DType::Fp32, seed, 0.3).unwrap()
}

pub fn vq() -> VqModel {
    let cfg = VqConfig {
        name: None,
        codebook_size: V,
        codebook_embed_dim: 4,
        codebook_l2_norm: true,
        ch: 32,
        encoder_ch_mult: vec![1, 1, 1],
        decoder_ch_mult: vec![1, 1, 1],
        z_channels: 32,
        num_res_blocks: 1,
        dtype: DType::Fp32,
    };
    VqModel::random(cfg, Device::Cpu, DType::Fp32, 5).unwrap()
}

/// A random ×2 up-sampler over `codes`.
pub fn upsampler(codes: &Tensor) -> Upsampler {
    let mut up = Upsampler::random(
        UpsamplerConfig {
            name: None,
            codebook_size: V,
            codebook_embed_dim: 4,
            scale: 2,
            channels: 16,
            low_blocks: 1,
            high_blocks: 1,
            dtype: DType::Fp32,
            vq: None,
        },
        Device::Cpu,
        4,
    )
    .unwrap();
    up.set_codebook(codes).unwrap();
    up
}

/// A verifier over a `target`-grid target and small draft model, a drafter over a `low`-grid GPT
/// with a ×2 up-sampler, one 16-code VQ.
pub fn engine_with(target: GridSize, low: GridSize) -> Engine {
    let vq_model = vq();
    let codes = vq_model.codes();
    let t = gpt(target, V, 2, 1);
    let draft = gpt(target, V, 1, 2);
    let drafter = gpt(low, V, 2, 3);
    let up = upsampler(&codes);
    Engine {
        verifier: Some(VerifierCore::new(t, Some(draft), &codes, 64).unwrap()),
        drafter: Some(DrafterCore::new(drafter, up, vq(), 64).unwrap()),
        ..Engine::default()
    }
}

/// Target 4×4, small draft model 4×4, drafter 2×2 with a ×2 up-sampler, one 16-code VQ.
pub fn engine() -> Engine {
    engine_with(GridSize::square(4), GridSize::square(2))
}

pub fn sampling(cfg: f64) -> SamplingParams {
    SamplingParams {
        cfg_scale: cfg,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    }
}

pub fn spec(id: &str, seed: u64, cfg: f64) -> SessionSpec {
    SessionSpec {
        id: id.into(),
        epoch: 0,
        condition: Condition::Class(1),
        sampling: sampling(cfg),
        seed,
    }
}

pub fn at(id: &str, committed: usize) -> SessionRef {
    SessionRef {
        id: id.into(),
        epoch: 0,
        committed,
    }
}
