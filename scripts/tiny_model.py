"""Write a tiny random-weight Gemma 3 (the embedded model's architecture and tokenizer).

The notebooks read their model from ``$TL_POWERSTEER_NOTEBOOK_MODEL``; the test script
points it at this folder so that every notebook runs in seconds. Its generations are
noise: it checks that the notebooks run, not what they find.

    python scripts/tiny_model.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tl_powersteer.models import embedded_model_dir

N_LAYERS = 6


def main(out: str) -> None:
    source = embedded_model_dir(progress=False)
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = N_LAYERS
    config.layer_types = config.layer_types[:N_LAYERS]
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    config.query_pre_attn_scalar = 32
    # Larger weights than the default init: the logits get peaked enough that steering can
    # reach the KL budgets the notebooks ask for.
    config.initializer_range = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    print(f"tiny Gemma 3 ({N_LAYERS} layers, d_model 64) written to {Path(out).resolve()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
