//! The tiny GPT config of the model tests.

use mulo_core::GridSize;
use mulo_model::config::{ConditionConfig, PositionEmbedding};
use mulo_model::{DType, GptConfig};

/// A 2-layer, 64-wide GPT on a 4×5 grid: caption-conditional (6 rows of 24) or class-conditional.
pub fn config(caption: bool, n_kv_head: Option<i64>, pos: PositionEmbedding) -> GptConfig {
    GptConfig {
        name: None,
        dim: 64,
        n_layer: 2,
        n_head: 4,
        n_kv_head,
        multiple_of: 32,
        ffn_dim_multiplier: None,
        ffn_hidden: None,
        norm_eps: 1e-5,
        rope_base: 10000.0,
        vocab_size: 97,
        condition: if caption {
            ConditionConfig::Caption { caption_dim: 24 }
        } else {
            ConditionConfig::Class { num_classes: 7 }
        },
        cls_token_num: if caption { 6 } else { 1 },
        grid: GridSize { rows: 4, cols: 5 },
        position_embedding: pos,
        dtype: DType::Fp32,
        caption_vocab: None,
        sampling: None,
        vq: None,
    }
}
