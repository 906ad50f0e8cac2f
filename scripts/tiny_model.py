"""Write a tiny random-weight copy of an embedded model (its architecture and tokenizer).

The notebooks read their models from ``$TL_POWERSTEER_NOTEBOOK_MODEL`` (Gemma 3 270M) and
``$TL_POWERSTEER_NOTEBOOK_CHAT_MODEL`` (SmolLM2-135M-Instruct, whose tokenizer carries the
chat template); the test script points them at folders written by this script so that
every notebook runs in seconds. Their generations are noise: they check that the notebooks
run, not what they find.

    python scripts/tiny_model.py OUT_DIR [EMBEDDED_MODEL]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tl_powersteer.models import EMBEDDED_MODEL, EMBEDDED_MODELS, embedded_model_dir

N_LAYERS = 6


def main(out: str, name: str = EMBEDDED_MODEL) -> None:
    if name not in EMBEDDED_MODELS:
        sys.exit(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}")
    source = embedded_model_dir(name, progress=False)
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = N_LAYERS
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:N_LAYERS]
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    if hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = 32
    # Larger weights than the default init: the logits get peaked enough that steering can
    # reach the KL budgets the notebooks ask for.
    config.initializer_range = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    print(f"tiny {name} ({N_LAYERS} layers, d_model 64) written to {Path(out).resolve()}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
