"""Test helper: a mulo model directory's weights (LlamaGen tensor names) saved as LlamaGen
releases its checkpoints, `torch.save({"model": state_dict}, path)` with real torch.

    python to_llamagen_pt.py MODEL_DIR OUT.pt

Runs in the test venv (scripts/setup-test-venv.sh). The result is what `mulo convert llamagen`
reads for a user's t2i_*.pt or vq_ds16_*.pt.
"""
import sys

import torch
from safetensors.torch import load_file


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    state = load_file(f"{model_dir}/model.safetensors")
    torch.save({"model": {k: v.float().contiguous() for k, v in state.items()}}, out)


if __name__ == "__main__":
    main()
