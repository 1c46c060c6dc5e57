//! The word-level caption tokenizer of the emoji family (a stand-in for T5 features): captions
//! become `max_len` word ids, left-padded like LlamaGen's T5 features, with a validity mask.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Id of padding positions.
pub const PAD: u32 = 0;
/// Id of words outside the vocabulary.
pub const UNK: u32 = 1;

/// Lower-case alphanumeric words of a text.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// A word-level tokenizer with a fixed vocabulary. Serialised as `{"vocab": [...], "max_len": N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "TokenizerFile", into = "TokenizerFile")]
pub struct CaptionTokenizer {
    /// Words by id; ids 0 and 1 are `<pad>` and `<unk>`.
    pub vocab: Vec<String>,
    /// Positions of an encoded caption.
    pub max_len: usize,
    index: HashMap<String, u32>,
}

/// The saved form of a tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenizerFile {
    vocab: Vec<String>,
    max_len: usize,
}

impl From<TokenizerFile> for CaptionTokenizer {
    fn from(f: TokenizerFile) -> Self {
        Self::from_vocab(f.vocab, f.max_len)
    }
}

impl From<CaptionTokenizer> for TokenizerFile {
    fn from(t: CaptionTokenizer) -> Self {
        Self {
            vocab: t.vocab,
            max_len: t.max_len,
        }
    }
}

/// An encoded caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedCaption {
    /// `max_len` ids, padding first.
    pub ids: Vec<u32>,
    /// `mask[i]` true where `ids[i]` is a word.
    pub mask: Vec<bool>,
    /// Words that mapped to `<unk>`.
    pub unknown: Vec<String>,
    /// Words cut because the caption was longer than `max_len`.
    pub truncated: usize,
}

impl CaptionTokenizer {
    /// A vocabulary of every word seen at least `min_count` times in `captions`, sorted.
    pub fn build<'a>(
        captions: impl IntoIterator<Item = &'a str>,
        min_count: usize,
        max_len: usize,
    ) -> Self {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for c in captions {
            for w in words(c) {
                *counts.entry(w).or_insert(0) += 1;
            }
        }
        let mut vocab = vec!["<pad>".to_string(), "<unk>".to_string()];
        vocab.extend(
            counts
                .into_iter()
                .filter(|(_, n)| *n >= min_count)
                .map(|(w, _)| w),
        );
        Self::from_vocab(vocab, max_len)
    }

    /// A tokenizer over a saved vocabulary.
    pub fn from_vocab(vocab: Vec<String>, max_len: usize) -> Self {
        let index = vocab
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        Self {
            vocab,
            max_len,
            index,
        }
    }

    /// Vocabulary size, `<pad>` and `<unk>` included.
    pub fn len(&self) -> usize {
        self.vocab.len()
    }

    /// True when the vocabulary holds only the special ids.
    pub fn is_empty(&self) -> bool {
        self.vocab.len() <= 2
    }

    /// Encodes `text`: the first `max_len` words, left-padded.
    pub fn encode(&self, text: &str) -> EncodedCaption {
        let all: Vec<String> = words(text).collect();
        let truncated = all.len().saturating_sub(self.max_len);
        let mut unknown = Vec::new();
        let kept: Vec<u32> = all
            .into_iter()
            .take(self.max_len)
            .map(|w| match self.index.get(&w) {
                Some(&i) => i,
                None => {
                    unknown.push(w);
                    UNK
                }
            })
            .collect();
        let pad = self.max_len - kept.len();
        let mut ids = vec![PAD; pad];
        ids.extend(&kept);
        let mut mask = vec![false; pad];
        mask.extend(std::iter::repeat_n(true, kept.len()));
        EncodedCaption {
            ids,
            mask,
            unknown,
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn builds_sorted_vocab_and_encodes_left_padded() {
        let t = CaptionTokenizer::build(["red apple", "green Apple!", "apple pie"], 2, 5);
        assert_eq!(t.vocab, vec!["<pad>", "<unk>", "apple"]);
        let e = t.encode("Red apple");
        assert_eq!(e.ids, vec![PAD, PAD, PAD, UNK, 2]);
        assert_eq!(e.mask, vec![false, false, false, true, true]);
        assert_eq!(e.unknown, vec!["red"]);
        let t = CaptionTokenizer::build(["a b c d e f g"], 1, 3);
        let e = t.encode("a b c d");
        assert_eq!(e.truncated, 1);
        assert_eq!(e.mask, vec![true; 3]);
    }

    #[test]
    fn json_round_trip_rebuilds_the_index() {
        let t = CaptionTokenizer::build(["red apple"], 1, 4);
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(
            text,
            r#"{"vocab":["<pad>","<unk>","apple","red"],"max_len":4}"#
        );
        let back: CaptionTokenizer = serde_json::from_str(&text).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.encode("red apple").ids, vec![PAD, PAD, 3, 2]);
    }

    proptest! {
        #[test]
        fn encoding_has_max_len_and_mask_matches_ids(text in "[a-z ,.!]{0,80}", max_len in 1usize..20) {
            let t = CaptionTokenizer::build(["the quick brown fox jumps"], 1, max_len);
            let e = t.encode(&text);
            prop_assert_eq!(e.ids.len(), max_len);
            prop_assert_eq!(e.mask.len(), max_len);
            for (id, m) in e.ids.iter().zip(&e.mask) {
                prop_assert_eq!(*id == PAD, !*m);
            }
            // padding comes first
            let first_word = e.mask.iter().position(|&m| m).unwrap_or(max_len);
            prop_assert!(e.mask[first_word..].iter().all(|&m| m));
        }
    }
}
