//! VQ tokenizer tests on a tiny random config: shapes, determinism, errors, save/load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mulo_model::seed::with_global_seed;
use mulo_model::{DType, VqConfig, VqModel};
use tch::{Device, Kind, Tensor};

fn cfg() -> VqConfig {
    VqConfig {
        name: None,
        codebook_size: 64,
        codebook_embed_dim: 8,
        codebook_l2_norm: true,
        ch: 32,
        encoder_ch_mult: vec![1, 2, 2],
        decoder_ch_mult: vec![1, 2, 2],
        z_channels: 32,
        num_res_blocks: 1,
        dtype: DType::Fp32,
    }
}

#[test]
fn encode_decode_shapes_and_determinism() {
    let vq = VqModel::random(cfg(), Device::Cpu, DType::Fp32, 0).unwrap();
    assert_eq!(vq.config().downsample_factor(), 4);
    let img = with_global_seed(2, || {
        Tensor::rand([2, 3, 16, 24], (Kind::Float, Device::Cpu))
    }) * 2.0
        - 1.0;
    let t = vq.encode(&img).unwrap();
    assert_eq!(t.size(), vec![2, 4, 6]);
    assert!(i64::try_from(t.min()).unwrap() >= 0 && i64::try_from(t.max()).unwrap() < 64);
    assert!(t.equal(&vq.encode(&img).unwrap()));
    let out = vq.decode(&t).unwrap();
    assert_eq!(out.size(), vec![2, 3, 16, 24]);
    // The quantiser picks the nearest normalised code: re-encoding the codes' own decode is not
    // guaranteed for random weights, but the codes are unit vectors.
    let norms = vq
        .codes()
        .pow_tensor_scalar(2)
        .sum_dim_intlist(1, false, Kind::Float)
        .sqrt();
    assert!(f64::try_from((norms - 1.0).abs().max()).unwrap() < 1e-5);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let vq = VqModel::random(cfg(), Device::Cpu, DType::Fp32, 0).unwrap();
    let e = vq
        .encode(&Tensor::zeros([1, 3, 10, 16], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(e.to_string().contains("multiples of 4"), "{e}");
    let e = vq
        .decode(&Tensor::from_slice(&[0i64, 64]).view([1, 1, 2]))
        .unwrap_err();
    assert!(e.to_string().contains("[0, 64)"), "{e}");
    assert!(vq
        .decode(&Tensor::zeros([4], (Kind::Int64, Device::Cpu)))
        .is_err());
}

#[test]
fn save_and_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let vq = VqModel::random(cfg(), Device::Cpu, DType::Fp32, 3).unwrap();
    vq.save(dir.path(), DType::Fp32).unwrap();
    let (back, unused) = VqModel::load(dir.path(), Device::Cpu, None).unwrap();
    assert!(unused.is_empty());
    let t = Tensor::from_slice(&[1i64, 5, 9, 63]).view([1, 2, 2]);
    assert!(vq
        .decode(&t)
        .unwrap()
        .allclose(&back.decode(&t).unwrap(), 0.0, 0.0, false));
    let e = mulo_model::Gpt::load(dir.path(), Device::Cpu, None).unwrap_err();
    assert!(e.to_string().contains("not a GPT"), "{e}");
}

#[test]
fn downsampler_is_decode_area_pool_encode() {
    let vq = VqModel::random(cfg(), Device::Cpu, DType::Fp32, 0).unwrap();
    let t = with_global_seed(3, || {
        Tensor::randint(64, [2, 4, 6], (Kind::Int64, Device::Cpu))
    });
    let d = vq.downsample_tokens(&t, 2).unwrap();
    assert_eq!(d.size(), vec![2, 2, 3]);
    // The same thing computed by hand: mean of each 2x2 pixel block of the decoded image.
    let px = vq.decode(&t).unwrap();
    let blocks = px
        .view([2, 3, 8, 2, 12, 2])
        .mean_dim([3i64, 5].as_slice(), false, Kind::Float);
    assert!(d.equal(&vq.encode(&blocks.clamp(-1.0, 1.0)).unwrap()));
    let e = vq.downsample_tokens(&t, 4).unwrap_err();
    assert!(e.to_string().contains("multiples of 4"), "{e}");
}

#[test]
fn unquantised_reconstruction_is_the_decode_of_exact_codes() {
    let mut vq = VqModel::random(cfg(), Device::Cpu, DType::Fp32, 1).unwrap();
    let img =
        with_global_seed(7, || Tensor::rand([1, 3, 8, 8], (Kind::Float, Device::Cpu))) * 2.0 - 1.0;
    let direct = vq.reconstruct_unquantised(&img).unwrap();
    assert_eq!(direct.size(), vec![1, 3, 8, 8]);
    // With random codes the quantised reconstruction differs ...
    let quantised = vq.decode(&vq.encode(&img).unwrap()).unwrap();
    assert!(f64::try_from((&quantised - &direct).abs().max()).unwrap() > 1e-3);
    // ... and once the codebook holds the image's own four latents, the two agree.
    let latents = vq.latents(&img);
    vq.set_codes(&Tensor::arange(4, (Kind::Int64, Device::Cpu)), &latents);
    let t = vq.encode(&img).unwrap();
    assert!(t
        .reshape([-1])
        .equal(&Tensor::arange(4, (Kind::Int64, Device::Cpu))));
    let exact = vq.decode(&t).unwrap();
    assert!(f64::try_from((exact - direct).abs().max()).unwrap() < 1e-4);
    let e = vq
        .reconstruct_unquantised(&Tensor::zeros([1, 3, 6, 8], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(e.to_string().contains("multiples of 4"), "{e}");
}
