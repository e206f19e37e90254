"""Regenerate the Hugging Face reference checkpoints in this folder (needs torch + transformers).

    python tests/data/hf/make.py

For each tiny architecture (GPT-2, Llama with grouped-query attention, Mistral with a
sliding window and tied embeddings) this writes, with transformers itself:

  <name>/config.json, <name>/model.safetensors   save_pretrained(safe_serialization=True)
  <name>/reference.npz                            what transformers computed on them:
      ids [2, 12] and logits [2, 12, vocab] (float32, eager attention),
      prompt [1, 6] and greedy [10] (generate(do_sample=False), no EOS stop)

tests/test_hf_golden.py loads these with flashjax.models.from_pretrained and compares
against reference.npz, so checkpoint loading is checked against transformers' own
numbers even where torch is not installed; tests/test_hf.py (with torch) checks that
the installed transformers still computes the same numbers from these files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/
from helpers import HF_TINY, HF_TINY_GREEDY, hf_tiny_ids  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    for i, (name, (cls, kwargs)) in enumerate(HF_TINY.items()):
        torch.manual_seed(1234 + i)
        config = getattr(transformers, cls)(**kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
        out = HERE / name
        out.mkdir(exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        ids = hf_tiny_ids(1)
        prompt = hf_tiny_ids(4, (1, 6))
        n_new = HF_TINY_GREEDY
        with torch.no_grad():
            logits = model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
            greedy = model.generate(
                torch.tensor(prompt), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )[0, prompt.shape[1]:].numpy()
        np.savez(out / "reference.npz", ids=ids, logits=logits, prompt=prompt, greedy=greedy)
        (out / "versions.json").write_text(json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__}, indent=1) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: {cls}, {size / 1024:.0f} KiB in {out}")


if __name__ == "__main__":
    main()
