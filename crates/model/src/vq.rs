//! LlamaGen's VQ tokenizer (`tokenizer/tokenizer_image/vq_model.py`): encoder, L2-normalised
//! codebook, decoder. Pixels are in [-1, 1].

use std::path::Path;

use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::config::{DType, ModelConfig, VqConfig};
use crate::error::{ModelError, Result};

#[derive(Debug)]
struct Norm(nn::GroupNorm);

impl Norm {
    fn new(p: nn::Path, ch: i64) -> Self {
        Self(nn::group_norm(
            p,
            32,
            ch,
            nn::GroupNormConfig {
                eps: 1e-6,
                ..Default::default()
            },
        ))
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.0.forward(x)
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            stride,
            padding,
            ..Default::default()
        },
    )
}

fn swish(x: &Tensor) -> Tensor {
    x * x.sigmoid()
}

#[derive(Debug)]
struct ResBlock {
    norm1: Norm,
    conv1: nn::Conv2D,
    norm2: Norm,
    conv2: nn::Conv2D,
    nin_shortcut: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(p: &nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            norm1: Norm::new(p / "norm1", cin),
            conv1: conv(p / "conv1", cin, cout, 3, 1, 1),
            norm2: Norm::new(p / "norm2", cout),
            conv2: conv(p / "conv2", cout, cout, 3, 1, 1),
            nin_shortcut: (cin != cout).then(|| conv(p / "nin_shortcut", cin, cout, 1, 1, 0)),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&swish(&self.norm1.forward(x)));
        let h = self.conv2.forward(&swish(&self.norm2.forward(&h)));
        match &self.nin_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

#[derive(Debug)]
struct AttnBlock {
    norm: Norm,
    q: nn::Conv2D,
    k: nn::Conv2D,
    v: nn::Conv2D,
    proj_out: nn::Conv2D,
}

impl AttnBlock {
    fn new(p: &nn::Path, ch: i64) -> Self {
        Self {
            norm: Norm::new(p / "norm", ch),
            q: conv(p / "q", ch, ch, 1, 1, 0),
            k: conv(p / "k", ch, ch, 1, 1, 0),
            v: conv(p / "v", ch, ch, 1, 1, 0),
            proj_out: conv(p / "proj_out", ch, ch, 1, 1, 0),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.norm.forward(x);
        let sz = h.size();
        let (b, c, hh, ww) = (sz[0], sz[1], sz[2], sz[3]);
        let q = self
            .q
            .forward(&h)
            .reshape([b, c, hh * ww])
            .permute([0, 2, 1]);
        let k = self.k.forward(&h).reshape([b, c, hh * ww]);
        let v = self.v.forward(&h).reshape([b, c, hh * ww]);
        let w = (q.bmm(&k) * (c as f64).powf(-0.5)).softmax(2, q.kind());
        let out = v.bmm(&w.permute([0, 2, 1])).reshape([b, c, hh, ww]);
        x + self.proj_out.forward(&out)
    }
}

#[derive(Debug)]
struct Level {
    res: Vec<ResBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<nn::Conv2D>,
}

impl Level {
    /// `n_res` residual blocks `block_in → block_out` (each followed by attention when `attn`);
    /// `resample` names the level's down/up-sampling conv and its stride, if it has one.
    fn new(
        lp: &nn::Path,
        block_in: i64,
        block_out: i64,
        n_res: i64,
        attn: bool,
        resample: Option<(&str, i64)>,
    ) -> Self {
        let mut res = Vec::new();
        let mut attns = Vec::new();
        let mut cin = block_in;
        for j in 0..n_res {
            res.push(ResBlock::new(&(lp / "res" / j), cin, block_out));
            cin = block_out;
            if attn {
                attns.push(AttnBlock::new(&(lp / "attn" / j), block_out));
            }
        }
        let resample = resample.map(|(name, stride)| {
            let padding = if stride == 1 { 1 } else { 0 };
            conv(lp / name / "conv", block_out, block_out, 3, stride, padding)
        });
        Self {
            res,
            attn: attns,
            resample,
        }
    }

    /// The residual (and attention) blocks, without the resampling.
    fn blocks(&self, mut h: Tensor) -> Tensor {
        for (j, r) in self.res.iter().enumerate() {
            h = r.forward(&h);
            if let Some(a) = self.attn.get(j) {
                h = a.forward(&h);
            }
        }
        h
    }
}

#[derive(Debug)]
struct Mid(ResBlock, AttnBlock, ResBlock);

impl Mid {
    fn new(p: &nn::Path, ch: i64) -> Self {
        Self(
            ResBlock::new(&(p / 0), ch, ch),
            AttnBlock::new(&(p / 1), ch),
            ResBlock::new(&(p / 2), ch, ch),
        )
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.2.forward(&self.1.forward(&self.0.forward(x)))
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: Norm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(p: &nn::Path, c: &VqConfig) -> Self {
        let n = c.encoder_ch_mult.len();
        let conv_in = conv(p / "conv_in", 3, c.ch, 3, 1, 1);
        let mut levels = Vec::with_capacity(n);
        let mut block_in = c.ch;
        for (i, &mult) in c.encoder_ch_mult.iter().enumerate() {
            let block_out = c.ch * mult;
            let last = i == n - 1;
            levels.push(Level::new(
                &(p / "conv_blocks" / i),
                block_in,
                block_out,
                c.num_res_blocks,
                last,
                (!last).then_some(("downsample", 2)),
            ));
            block_in = block_out;
        }
        Self {
            conv_in,
            levels,
            mid: Mid::new(&(p / "mid"), block_in),
            norm_out: Norm::new(p / "norm_out", block_in),
            conv_out: conv(p / "conv_out", block_in, c.z_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for level in &self.levels {
            h = level.blocks(h);
            if let Some(d) = &level.resample {
                h = d.forward(&h.constant_pad_nd([0, 1, 0, 1]));
            }
        }
        let h = self.mid.forward(&h);
        self.conv_out.forward(&swish(&self.norm_out.forward(&h)))
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid: Mid,
    levels: Vec<Level>,
    norm_out: Norm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(p: &nn::Path, c: &VqConfig) -> Self {
        let n = c.decoder_ch_mult.len();
        let mut block_in = c.ch * c.decoder_ch_mult[n - 1];
        let conv_in = conv(p / "conv_in", c.z_channels, block_in, 3, 1, 1);
        let mid = Mid::new(&(p / "mid"), block_in);
        let mut levels = Vec::with_capacity(n);
        for (idx, i_level) in (0..n).rev().enumerate() {
            let block_out = c.ch * c.decoder_ch_mult[i_level];
            levels.push(Level::new(
                &(p / "conv_blocks" / idx),
                block_in,
                block_out,
                c.num_res_blocks + 1,
                i_level == n - 1,
                (i_level != 0).then_some(("upsample", 1)),
            ));
            block_in = block_out;
        }
        Self {
            conv_in,
            mid,
            levels,
            norm_out: Norm::new(p / "norm_out", block_in),
            conv_out: conv(p / "conv_out", block_in, 3, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid.forward(&self.conv_in.forward(z));
        for level in &self.levels {
            h = level.blocks(h);
            if let Some(u) = &level.resample {
                let s = h.size();
                h = u.forward(&h.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None));
            }
        }
        self.conv_out.forward(&swish(&self.norm_out.forward(&h)))
    }
}

/// A LlamaGen VQ tokenizer.
#[derive(Debug)]
pub struct VqModel {
    cfg: VqConfig,
    vs: VarStore,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
    codebook: Tensor,
}

impl VqModel {
    fn build(cfg: VqConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let encoder = Encoder::new(&(&root / "encoder"), &cfg);
        let decoder = Decoder::new(&(&root / "decoder"), &cfg);
        let quant_conv = conv(
            &root / "quant_conv",
            cfg.z_channels,
            cfg.codebook_embed_dim,
            1,
            1,
            0,
        );
        let post_quant_conv = conv(
            &root / "post_quant_conv",
            cfg.codebook_embed_dim,
            cfg.z_channels,
            1,
            1,
            0,
        );
        let n = cfg.codebook_size as f64;
        let codebook = (&root / "quantize" / "embedding").var(
            "weight",
            &[cfg.codebook_size, cfg.codebook_embed_dim],
            nn::Init::Uniform {
                lo: -1.0 / n,
                up: 1.0 / n,
            },
        );
        Ok(Self {
            cfg,
            vs,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            codebook,
        })
    }

    /// A randomly initialised tokenizer (torch's default initialisation), global seed `seed`.
    pub fn random(cfg: VqConfig, device: Device, dtype: DType, seed: i64) -> Result<Self> {
        let mut m = crate::seed::with_global_seed(seed, || Self::build(cfg, device))?;
        m.vs.set_kind(dtype.kind());
        m.cfg.dtype = dtype;
        Ok(m)
    }

    /// Loads a model directory; `dtype` overrides the config's.
    pub fn load(dir: &Path, device: Device, dtype: Option<DType>) -> Result<(Self, Vec<String>)> {
        let cfg = ModelConfig::load_vq(dir)?;
        let dtype = dtype.unwrap_or(cfg.dtype);
        let mut m = crate::seed::without_seed(|| Self::build(cfg, device))?;
        m.cfg.dtype = dtype;
        let unused = checkpoint::load_dir_weights(&mut m.vs, dir, dtype)?;
        Ok((m, unused))
    }

    /// Writes the model directory, weights stored in `dtype`.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.dtype = dtype;
        checkpoint::save_dir(ModelConfig::Vq(cfg), &self.vs, dir, dtype)
    }

    /// The configuration.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// The variables (for training).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn kind(&self) -> Kind {
        self.codebook.kind()
    }

    /// Codes as used by the quantiser: `[codebook_size, embed_dim]`, L2-normalised when configured.
    pub fn codes(&self) -> Tensor {
        let e = self.codebook.to_kind(Kind::Float);
        if self.cfg.codebook_l2_norm {
            l2_normalize(&e)
        } else {
            e
        }
    }

    /// Training forward (straight-through estimator, LlamaGen's losses): returns the
    /// reconstruction `[B, 3, H, W]`, the codebook loss `mean((z_q − sg[z])²)`, the commitment loss
    /// `mean((sg[z_q] − z)²)` (on L2-normalised vectors when configured) and the token ids.
    pub fn forward_train(&self, images: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
        let z = self.quant_conv.forward(&self.encoder.forward(images));
        let zs = z.size();
        let e = self.cfg.codebook_embed_dim;
        let zf = z.permute([0, 2, 3, 1]);
        let zn = if self.cfg.codebook_l2_norm {
            l2_normalize(&zf)
        } else {
            zf
        };
        let codes = self.codes();
        let idx = tch::no_grad(|| {
            let flat = zn.reshape([-1, e]);
            let d = codes
                .pow_tensor_scalar(2)
                .sum_dim_intlist(1, false, Kind::Float)
                - flat.matmul(&codes.tr()) * 2.0;
            d.argmin(1, false)
        });
        let zq = codes.index_select(0, &idx).view_as(&zn);
        let codebook_loss = (&zq - zn.detach()).pow_tensor_scalar(2).mean(Kind::Float);
        let commit_loss = (zq.detach() - &zn).pow_tensor_scalar(2).mean(Kind::Float);
        let st = &zn + (&zq - &zn).detach();
        let recon = self
            .decoder
            .forward(&self.post_quant_conv.forward(&st.permute([0, 3, 1, 2])));
        (
            recon,
            codebook_loss,
            commit_loss,
            idx.view([zs[0], zs[2], zs[3]]),
        )
    }

    /// Training decode of token ids `[B, h, w]`: gradients reach `post_quant_conv` and the decoder
    /// only (the codes are detached), so encoding, and with it every token, stays unchanged.
    pub fn decode_train(&self, tokens: &Tensor) -> Tensor {
        let s = tokens.size();
        let q = self
            .codes()
            .detach()
            .index_select(0, &tokens.reshape([-1]))
            .view([s[0], s[1], s[2], self.cfg.codebook_embed_dim])
            .permute([0, 3, 1, 2]);
        self.decoder.forward(&self.post_quant_conv.forward(&q))
    }

    /// Copies every variable of `other` whose name and shape match one of this model's (decoder
    /// variables only when `with_decoder`); returns how many were copied.
    pub fn copy_weights_from(&mut self, other: &VqModel, with_decoder: bool) -> usize {
        let src = other.vs.variables();
        let mut n = 0;
        tch::no_grad(|| {
            for (name, mut dst) in self.vs.variables() {
                if !with_decoder && name.starts_with("decoder.") {
                    continue;
                }
                if let Some(t) = src.get(&name) {
                    if t.size() == dst.size() {
                        dst.copy_(&t.to_kind(dst.kind()));
                        n += 1;
                    }
                }
            }
        });
        n
    }

    /// Latents `[N, embed_dim]` as the quantiser sees them (normalised when configured), for
    /// re-seeding unused codes during training.
    pub fn latents(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let z = self.quant_conv.forward(&self.encoder.forward(images));
            let flat = z
                .permute([0, 2, 3, 1])
                .reshape([-1, self.cfg.codebook_embed_dim]);
            if self.cfg.codebook_l2_norm {
                l2_normalize(&flat)
            } else {
                flat
            }
        })
    }

    /// Overwrites codebook rows `rows` with `values` `[len(rows), embed_dim]` (training only).
    pub fn set_codes(&mut self, rows: &Tensor, values: &Tensor) {
        tch::no_grad(|| {
            let _ = self
                .codebook
                .index_copy_(0, rows, &values.to_kind(self.codebook.kind()));
        });
    }

    /// The variables, mutably (to unfreeze or load a checkpoint for training).
    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// The encoder's latents `[B, embed_dim, H/f, W/f]` of images `[B, 3, H, W]` (checked), before
    /// any normalisation.
    fn encoder_latents(&self, images: &Tensor) -> Result<Tensor> {
        let s = images.size();
        let f = self.cfg.downsample_factor();
        if s.len() != 4 || s[1] != 3 || s[2] % f != 0 || s[3] % f != 0 {
            return Err(ModelError::InvalidInput(format!(
                "images must be [B, 3, H, W] with H and W multiples of {f}, got {s:?}"
            )));
        }
        Ok(tch::no_grad(|| {
            self.quant_conv
                .forward(&self.encoder.forward(&images.to_kind(self.kind())))
        }))
    }

    /// Encodes images `[B, 3, H, W]` in [-1, 1] to token ids `[B, H/f, W/f]`.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let z = self.encoder_latents(images)?;
        Ok(tch::no_grad(|| {
            let zs = z.size();
            let flat = z
                .permute([0, 2, 3, 1])
                .reshape([-1, self.cfg.codebook_embed_dim])
                .to_kind(Kind::Float);
            let flat = if self.cfg.codebook_l2_norm {
                l2_normalize(&flat)
            } else {
                flat
            };
            let codes = self.codes();
            let d = flat
                .pow_tensor_scalar(2)
                .sum_dim_intlist(1, true, Kind::Float)
                + codes
                    .pow_tensor_scalar(2)
                    .sum_dim_intlist(1, false, Kind::Float)
                - flat.matmul(&codes.tr()) * 2.0;
            d.argmin(1, false).view([zs[0], zs[2], zs[3]])
        }))
    }

    /// Decodes token ids `[B, h, w]` to images `[B, 3, h·f, w·f]` (fp32, nominally in [-1, 1]).
    pub fn decode(&self, tokens: &Tensor) -> Result<Tensor> {
        let s = tokens.size();
        if s.len() != 3 {
            return Err(ModelError::InvalidInput(format!(
                "tokens must be [B, h, w], got {s:?}"
            )));
        }
        let n = self.cfg.codebook_size;
        let (lo, hi) = (i64::try_from(tokens.min())?, i64::try_from(tokens.max())?);
        if lo < 0 || hi >= n {
            return Err(ModelError::InvalidInput(format!(
                "token ids must be in [0, {n}), found {}",
                if lo < 0 { lo } else { hi }
            )));
        }
        Ok(tch::no_grad(|| {
            let q = self
                .codes()
                .index_select(0, &tokens.reshape([-1]))
                .view([s[0], s[1], s[2], self.cfg.codebook_embed_dim])
                .permute([0, 3, 1, 2])
                .to_kind(self.kind());
            self.decoder
                .forward(&self.post_quant_conv.forward(&q))
                .to_kind(Kind::Float)
        }))
    }

    /// Reconstructs images `[B, 3, H, W]` without the quantiser: the decoder fed the encoder's
    /// latents themselves (normalised when configured), as an unlimited codebook would. What it
    /// loses is the encoder's and decoder's share of the error; the rest is quantisation's.
    pub fn reconstruct_unquantised(&self, images: &Tensor) -> Result<Tensor> {
        let z = self.encoder_latents(images)?;
        Ok(tch::no_grad(|| {
            let z = if self.cfg.codebook_l2_norm {
                l2_normalize(&z.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
            } else {
                z
            };
            self.decoder
                .forward(&self.post_quant_conv.forward(&z))
                .to_kind(Kind::Float)
        }))
    }

    /// The default down-sampler `D_r` (DESIGN §2.2 step 7): decodes token ids `[B, h, w]`, averages
    /// `r×r` pixel blocks (area down-sampling) and encodes the result: `[B, h/r, w/r]`.
    pub fn downsample_tokens(&self, tokens: &Tensor, r: i64) -> Result<Tensor> {
        let s = tokens.size();
        if r < 1 || s.len() != 3 || s[1] % r != 0 || s[2] % r != 0 {
            return Err(ModelError::InvalidInput(format!(
                "down-sampling by {r} needs tokens [B, h, w] with h and w multiples of {r}, got {s:?}"
            )));
        }
        let pixels = self.decode(tokens)?;
        let small = tch::no_grad(|| {
            pixels
                .avg_pool2d([r, r], [r, r], [0, 0], false, true, None::<i64>)
                .clamp(-1.0, 1.0)
        });
        self.encode(&small)
    }
}

/// `x / max(‖x‖₂, 1e-12)` along the last dimension (torch's `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x
        .pow_tensor_scalar(2)
        .sum_dim_intlist(-1, true, Kind::Float)
        .sqrt()
        .clamp_min(1e-12);
    x / n
}
