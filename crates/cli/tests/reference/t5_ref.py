"""Test helper: a tiny random T5 v1.1 encoder in Hugging Face's layout, and reference features.

    python t5_ref.py OUT_DIR PROMPTS_JSON [--shards N] [--relu]

Runs in the test venv (scripts/setup-test-venv.sh: torch, transformers, tokenizers from PyPI).
Builds everything locally, nothing is downloaded:
  OUT_DIR/hf/            config.json, model.safetensors (or N shards + model.safetensors.index.json,
                         with a decoder too, as a T5ForConditionalGeneration checkpoint would have),
                         tokenizer.json (a Unigram tokenizer trained here, T5-style: Metaspace
                         pre-tokenizer, `</s>` appended, `<pad>` = 0)
  OUT_DIR/ref.npy        [N, 120, d_model] float32: transformers' T5EncoderModel run on the
                         tokenizer's ids (transformers' own tokenizer class on tokenizer.json,
                         max_length 120, padding to max_length, truncation), then LlamaGen's left
                         padding (valid rows moved last, padding rows zeroed)
  OUT_DIR/mask.npy       [N, 120] float32, 1 on valid rows (after the left padding)
  OUT_DIR/ids.json       the ids of each prompt, for diagnostics
Prompts are lower-cased and whitespace-collapsed first, as mulo does (docs/byom.md).
"""
import json
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, T5ForConditionalGeneration

MAX_LEN = 120
CORPUS = [
    "a red apple on a white table",
    "a dog face with big eyes",
    "a slice of pizza with cheese and tomato",
    "a rocket flying to the moon at night",
    "the flag of japan waving in the wind",
    "a blue porsche parked in front of a yellow brick wall",
    "an astronaut riding a horse in the forest near a river",
    "a map of the united states made out of sushi",
    "grinning face with smiling eyes",
    "a kangaroo wearing an orange hoodie and blue sunglasses",
]


def build_tokenizer():
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
    return tok


def main():
    out, prompts_path = sys.argv[1], sys.argv[2]
    shards = int(sys.argv[sys.argv.index("--shards") + 1]) if "--shards" in sys.argv else 1
    relu = "--relu" in sys.argv
    prompts = json.load(open(prompts_path))
    hf = os.path.join(out, "hf")
    os.makedirs(hf, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(hf, "tokenizer.json"))

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_layers=3,
        num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
        feed_forward_proj="relu" if relu else "gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    full = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0.0, 0.5)
    if shards > 1:
        size = sum(p.numel() * 4 for p in full.parameters())
        full.save_pretrained(hf, max_shard_size=f"{size // shards // 1000 + 1}KB")
    else:
        full.save_pretrained(hf)
    enc = T5EncoderModel.from_pretrained(hf).eval()

    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf, "tokenizer.json"),
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    texts = [" ".join(p.split()).lower() for p in prompts]
    t = fast(texts, max_length=MAX_LEN, padding="max_length", truncation=True,
             add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        feats = enc(input_ids=t["input_ids"], attention_mask=t["attention_mask"])["last_hidden_state"]
    masks = t["attention_mask"]
    # LlamaGen's left padding (autoregressive/sample/sample_t2i.py).
    new_masks = torch.flip(masks, dims=[-1])
    rows = []
    for f, m in zip(feats, masks):
        n = int(m.sum().item())
        rows.append(torch.cat([f[n:], f[:n]]))
    ref = torch.stack(rows) * new_masks[:, :, None]
    np.save(os.path.join(out, "ref.npy"), ref.float().numpy())
    np.save(os.path.join(out, "mask.npy"), new_masks.float().numpy())
    json.dump([ids[: int(m.sum())].tolist() for ids, m in zip(t["input_ids"], masks)],
              open(os.path.join(out, "ids.json"), "w"))
    print(json.dumps({"files": sorted(os.listdir(hf)), "vocab": tok.get_vocab_size()}))


if __name__ == "__main__":
    main()
