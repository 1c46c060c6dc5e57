"""Test helper: a tiny random LlamaGen-format checkpoint and reference numbers, with numpy only.

    python llamagen_ref.py OUT_DIR KIND [--corrupt NAME]

KIND is c2i or t2i. Writes OUT_DIR/ck.pt (the zip layout of torch.save: data.pkl whose tensors are
persistent storages rebuilt by torch._utils._rebuild_tensor_v2, data/<key>, byteorder, version),
OUT_DIR/ref.json with teacher-forced processed probabilities and greedy CFG tokens computed by an
independent float64 implementation of LlamaGen's GPT written from its description (pre-RMSNorm,
fused wqkv, SwiGLU, 2D RoPE on interleaved pairs with zeroed condition positions, caption mask with
each position always seeing itself, CFG u + (c - u) * s), and for t2i the caption features and mask
as .npy files. --corrupt NAME gives that tensor a wrong last dimension.
"""
import io
import json
import pickle
import sys
import types
import zipfile

import numpy as np

DIM, LAYERS, HEADS, VOCAB, GRID = 32, 2, 4, 64, 4
HD = DIM // HEADS
CAP_DIM, CAP_LEN, CLASSES = 12, 6, 5


def ffn_hidden():
    h = int(2 * 4 * DIM / 3)
    return h + (256 - h % 256) % 256


def make_state(kind, rng):
    sd = {}
    def w(*shape, std=0.3):
        return rng.normal(0.0, std, size=shape).astype(np.float32)
    sd["tok_embeddings.weight"] = w(VOCAB, DIM, std=1.0)
    if kind == "c2i":
        sd["cls_embedding.embedding_table.weight"] = w(CLASSES + 1, DIM, std=1.0)
    else:
        sd["cls_embedding.cap_proj.fc1.weight"] = w(DIM, CAP_DIM)
        sd["cls_embedding.cap_proj.fc2.weight"] = w(DIM, DIM)
        sd["cls_embedding.uncond_embedding"] = w(CAP_LEN, CAP_DIM, std=1.0)
    hid = ffn_hidden()
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = w(3 * DIM, DIM)
        sd[p + "attention.wo.weight"] = w(DIM, DIM)
        sd[p + "feed_forward.w1.weight"] = w(hid, DIM, std=0.2)
        sd[p + "feed_forward.w2.weight"] = w(DIM, hid, std=0.1)
        sd[p + "feed_forward.w3.weight"] = w(hid, DIM, std=0.2)
        sd[p + "attention_norm.weight"] = (1.0 + w(DIM, std=0.1)).astype(np.float32)
        sd[p + "ffn_norm.weight"] = (1.0 + w(DIM, std=0.1)).astype(np.float32)
    sd["norm.weight"] = (1.0 + w(DIM, std=0.1)).astype(np.float32)
    sd["output.weight"] = w(VOCAB, DIM)
    return sd


# ---- torch.save's zip layout, written without torch -------------------------------------------
torch_mod = types.ModuleType("torch")
utils_mod = types.ModuleType("torch._utils")


class FloatStorage:
    pass


FloatStorage.__module__ = "torch"
torch_mod.FloatStorage = FloatStorage


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch_mod
sys.modules["torch._utils"] = utils_mod


class StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class TensorRef:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        import collections
        return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def torch_save(obj_sd, path):
    import collections
    storages, refs = {}, collections.OrderedDict()
    for i, (name, arr) in enumerate(obj_sd.items()):
        key = str(i)
        storages[key] = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        refs[name] = TensorRef(StorageRef(key, arr.size), list(arr.shape))
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump({"model": refs, "steps": 1000, "epoch": 3})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("ck/data.pkl", buf.getvalue())
        z.writestr("ck/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"ck/data/{key}", raw)
        z.writestr("ck/version", "3\n")


# ---- independent float64 reference -------------------------------------------------------------
def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w


def rope_angles(n_cls, total):
    half = HD // 2
    freqs = np.array([10000.0 ** (-(2.0 * m) / half) for m in range(half // 2)])
    ang = np.zeros((total, half))
    valid = np.zeros(total, dtype=bool)
    for p in range(n_cls, total):
        a, b = divmod(p - n_cls, GRID)
        ang[p] = np.concatenate([a * freqs, b * freqs])
        valid[p] = True
    return ang, valid


def rotate(x, ang, valid):
    # x: [L, H, HD]; interleaved pairs; condition positions have cos = sin = 0 (zeroed).
    c = np.cos(ang) * valid[:, None]
    s = np.sin(ang) * valid[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c[:, None, :] - x1 * s[:, None, :]
    out[..., 1::2] = x1 * c[:, None, :] + x0 * s[:, None, :]
    return out


def forward(sd, cond_emb, toks, cond_mask):
    """Logits [L, V] of one sequence: condition rows then image tokens."""
    f = {k: v.astype(np.float64) for k, v in sd.items()}
    x = np.concatenate([cond_emb, f["tok_embeddings.weight"][toks]], 0) if len(toks) else cond_emb
    L, n_cls = x.shape[0], cond_emb.shape[0]
    ang, valid = rope_angles(n_cls, L)
    allowed = np.tril(np.ones((L, L), dtype=bool))
    if cond_mask is not None:
        allowed[:, :n_cls] &= np.asarray(cond_mask, dtype=bool)[None, :]
        allowed |= np.eye(L, dtype=bool)
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = rms(x, f[p + "attention_norm.weight"])
        qkv = h @ f[p + "attention.wqkv.weight"].T
        q, k, v = (qkv[:, j * DIM:(j + 1) * DIM].reshape(L, HEADS, HD) for j in range(3))
        q, k = rotate(q, ang, valid), rotate(k, ang, valid)
        att = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(HD)
        att = np.where(allowed[None], att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hij,jhd->ihd", att, v).reshape(L, DIM)
        x = x + o @ f[p + "attention.wo.weight"].T
        h = rms(x, f[p + "ffn_norm.weight"])
        a = h @ f[p + "feed_forward.w1.weight"].T
        x = x + ((a / (1 + np.exp(-a))) * (h @ f[p + "feed_forward.w3.weight"].T)) @ f[p + "feed_forward.w2.weight"].T
    return rms(x, f["norm.weight"]) @ f["output.weight"].T


def cond_embeddings(sd, kind, cond):
    f = {k: v.astype(np.float64) for k, v in sd.items()}
    if kind == "c2i":
        return [f["cls_embedding.embedding_table.weight"][[cond]], f["cls_embedding.embedding_table.weight"][[CLASSES]]]
    def proj(c):
        y = c @ f["cls_embedding.cap_proj.fc1.weight"].T
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
        return y @ f["cls_embedding.cap_proj.fc2.weight"].T
    return [proj(cond.astype(np.float64)), proj(f["cls_embedding.uncond_embedding"])]


def guided(sd, kind, cond, toks, mask, cfg):
    """Combined logits [len(toks)+1, V] predicting image tokens 0..len(toks)."""
    ce, ue = cond_embeddings(sd, kind, cond)
    n = ce.shape[0]
    c = forward(sd, ce, toks, mask)[n - 1:]
    if cfg <= 1.0:
        return c
    u = forward(sd, ue, toks, mask)[n - 1:]
    return u + (c - u) * cfg


def main():
    out, kind = sys.argv[1], sys.argv[2]
    corrupt = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--corrupt" else None
    rng = np.random.default_rng(7 if kind == "c2i" else 8)
    sd = make_state(kind, rng)
    if corrupt:
        a = sd[corrupt]
        sd[corrupt] = np.zeros(a.shape[:-1] + (a.shape[-1] - 1,), dtype=np.float32)
    torch_save(sd, f"{out}/ck.pt")
    if corrupt:
        return
    if kind == "c2i":
        cond, mask = 2, None
    else:
        cond = rng.normal(0, 1, size=(CAP_LEN, CAP_DIM)).astype(np.float32)
        mask = np.array([0, 0, 1, 1, 1, 1], dtype=np.float32)  # left-padded caption
        cond = cond * mask[:, None]
        np.save(f"{out}/features.npy", cond)
        np.save(f"{out}/mask.npy", mask)
    n = GRID * GRID
    cfg = 3.0
    # greedy (top-k 1) generation with CFG
    toks = []
    for _ in range(n):
        toks.append(int(np.argmax(guided(sd, kind, cond, np.array(toks, dtype=int), mask, cfg)[-1])))
    # teacher-forced processed probabilities (top-k 0, top-p 1, temperature 1) of a fixed grid
    fixed = rng.integers(0, VOCAB, size=n)
    logits = guided(sd, kind, cond, fixed[:-1], mask, cfg)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    json.dump({"cfg": cfg, "greedy_tokens": toks, "tokens": fixed.tolist(), "probs": probs.tolist(),
               "grid": GRID, "heads": HEADS}, open(f"{out}/ref.json", "w"))
    json.dump(fixed.tolist(), open(f"{out}/tokens.json", "w"))


if __name__ == "__main__":
    main()
