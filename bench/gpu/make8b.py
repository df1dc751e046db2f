"""Make the 8B-shaped random Llama of ../shared/gpu/wake8b.py (7.24 B params, 14.5 GB bf16)
with the recipe's make_models.make (PYTHONPATH=/tmp/vb), initialised directly in bf16."""
import sys

import torch
from make_models import make

torch.set_default_dtype(torch.bfloat16)
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/models/m8b"
print(make(out + ".tmp", "cuda" if torch.cuda.is_available() else "cpu", 32000, hidden_size=4096,
           intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=8), flush=True)
import os  # noqa: E402

os.rename(out + ".tmp", out)  # appears whole or not at all
