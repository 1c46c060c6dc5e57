//! `mulo data images` on a folder of PNG and JPEG files with a bad file and captions: shards, the
//! index, the skipped file named on stderr, and one-line errors for unusable input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{fails_one_line, mulo};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_image_folder_becomes_shards() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("photos");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..9u8 {
        let img = image::RgbImage::from_pixel(40 + u32::from(i), 30, image::Rgb([i * 20, 100, 50]));
        img.save(src.join(format!("p{i}.png"))).unwrap();
    }
    image::RgbImage::from_pixel(16, 48, image::Rgb([10, 200, 10]))
        .save(src.join("sub/tall.jpg"))
        .unwrap();
    std::fs::write(src.join("sub/bad.png"), b"\x89PNG but not really").unwrap();
    let caps = dir.path().join("captions.jsonl");
    std::fs::write(
        &caps,
        "{\"file\": \"sub/tall.jpg\", \"caption\": \"a green bar\"}\n",
    )
    .unwrap();
    let out = dir.path().join("set");
    let o = mulo(&[
        "data",
        "images",
        "--dir",
        s(&src),
        "--captions",
        s(&caps),
        "--size",
        "16",
        "--out",
        s(&out),
        "--shard-size",
        "4",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("wrote 10 images of 16x16 px") && stdout.contains("in 3 shard(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("skipped 1 unreadable file(s)"), "{stdout}");
    assert!(stderr.contains("skipped sub/bad.png"), "{stderr}");
    let index = std::fs::read_to_string(out.join("index.jsonl")).unwrap();
    assert!(
        index.contains("\"file\":\"sub/tall.jpg\",\"caption\":\"a green bar\""),
        "{index}"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["count"], 10);
    assert_eq!(meta["shards"][2]["count"], 2);
}

#[test]
fn unusable_input_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("o");
    let e = fails_one_line(&[
        "data",
        "images",
        "--dir",
        s(d),
        "--size",
        "16",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("no .png, .jpg or .jpeg files"), "{e}");
    std::fs::write(d.join("x.png"), b"junk").unwrap();
    let e = fails_one_line(&[
        "data",
        "images",
        "--dir",
        s(d),
        "--size",
        "16",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("none of the 1 image files could be read"), "{e}");
    assert!(!out.join("index.jsonl").exists(), "an empty index was left");
    // A good set rebuilt into the same directory from unreadable files keeps no meta.json: the
    // old one would describe shards that are not there (and up-sampler token caches key on it).
    let good = d.join("good");
    std::fs::create_dir_all(&good).unwrap();
    image::RgbImage::from_pixel(20, 20, image::Rgb([9, 9, 9]))
        .save(good.join("a.png"))
        .unwrap();
    let rebuilt = d.join("rebuilt");
    let set = |src: &Path| {
        [
            "data",
            "images",
            "--dir",
            s(src),
            "--size",
            "16",
            "--out",
            s(&rebuilt),
        ]
        .map(str::to_string)
    };
    common::ok(&set(&good));
    assert!(rebuilt.join("meta.json").exists());
    std::fs::write(good.join("a.png"), b"junk").unwrap();
    fails_one_line(&set(&good));
    assert!(
        !rebuilt.join("meta.json").exists(),
        "a stale meta.json was left"
    );
    let caps = d.join("c.jsonl");
    std::fs::write(&caps, "not json\n").unwrap();
    let e = fails_one_line(&[
        "data",
        "images",
        "--dir",
        s(d),
        "--size",
        "16",
        "--out",
        s(&out),
        "--captions",
        s(&caps),
    ]);
    assert!(e.contains("c.jsonl:1"), "{e}");
}
