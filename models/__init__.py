"""hwgen model zoo: small reference transformer models, checkpoints and text.

- :mod:`models.bert_block` -- one BERT-style post-norm encoder block (random, seeded weights).
- :mod:`models.tiny_gpt`   -- a byte-level GPT-style causal decoder with a KV cache and a
  shipped trained checkpoint (``models/tiny_gpt.pt``).
- ``models/data/``         -- training/eval text for tiny_gpt, sentence sets for MiniLM.

See ``models/README.md`` for provenance, licenses and how the checkpoint was trained.
"""
