//! The bundled emoji family (models/emoji) draws a newcomer's everyday prompts: with
//! `--method mulo` at its defaults, the evaluator classifies each image as its prompt's category
//! for at least 3 of 4 fixed seeds (issue 15).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use serde_json::Value;

use common::ok;

/// Prompt, category and subcategory (the emoji's own, from emoji-datasource).
const PROMPTS: [(&str, &str, &str); 5] = [
    ("red apple", "Food & Drink", "food-fruit"),
    ("dog face", "Animals & Nature", "animal-mammal"),
    ("pizza", "Food & Drink", "food-prepared"),
    ("rocket", "Travel & Places", "transport-air"),
    ("flag: Japan", "Flags", "country-flag"),
];

#[test]
#[ignore = "issue 15: the 2026-12-06 family draws flag: Japan 4/4 and the other four 0/4"]
fn bundled_family_draws_everyday_prompts_with_mulo() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // `mulo bench` fits FID-emoji against a real image set; a synthetic one stands in (the test
    // reads only adherence, which needs the evaluator alone), so no download is needed.
    let pk = mulo_train::data::synthetic::packages(d);
    let data = d.join("data");
    let (google, twitter) = (s(&pk[0].1), s(&pk[1].1));
    ok(&[
        "data",
        "emoji",
        "--google",
        &google,
        "--twitter",
        &twitter,
        "--out",
        &s(&data),
    ]);
    let prompts = d.join("p.tsv");
    let mut tsv = String::from("prompt\tcategory\tsubcategory\n");
    for (p, c, sc) in PROMPTS {
        tsv.push_str(&format!("{p}\t{c}\t{sc}\n"));
    }
    std::fs::write(&prompts, tsv).unwrap();
    let family = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/emoji");
    let json = d.join("bench.json");
    // Image j uses prompt j mod 5 and seed j: four seeds per prompt.
    ok(&[
        "bench",
        "--family",
        family,
        "--method",
        "mulo",
        "--prompts",
        &s(&prompts),
        "--n",
        "20",
        "--warmup",
        "0",
        "--seed",
        "0",
        "--data",
        &s(&data),
        "--json",
        &s(&json),
    ]);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mulo = report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "mulo")
        .unwrap();
    let by = &mulo["adherence_by_prompt"];
    let mut failed = Vec::new();
    for (p, _, _) in PROMPTS {
        assert_eq!(by[p]["n"], 4, "{by}");
        let hits = by[p]["adherence"].as_f64().unwrap() * 4.0;
        if hits < 2.5 {
            failed.push(format!("{p}: {hits:.0}/4"));
        }
    }
    assert!(
        failed.is_empty(),
        "drawn as their category for < 3 of 4 seeds: {failed:?}\n{by}"
    );
}
