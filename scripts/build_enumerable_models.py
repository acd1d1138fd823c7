"""Build the enumerable model pair: p0 and p1 over a vocabulary of five tokens.

With ids ``<|bos|>``, ``<|eos|>``, ``a``, ``b``, ``c`` and a length limit of 4 tokens,
a prompt has 1 + 4 + 16 + 64 + 256 = 341 possible completions, so H(p0), H(p1), dH,
KL and the first-order term can be computed exactly by enumeration (tests/exact.py)
and every estimate of the pipeline checked against the truth.

p0 is trained on strings of a small Markov chain over a, b, c; p1 is p0 after a few
optimizer steps on strings that favour ``c``. Both are saved under
``data/models/enum-p0`` and ``data/models/enum-p1``::

    .venv/bin/python scripts/build_enumerable_models.py
"""

from __future__ import annotations

import random

import torch
from build_tiny_models import BOS, EOS, save, train
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 99
LETTERS = ["a", "b", "c"]
# Next-letter probabilities of the training chain, and the chance to stop after a letter.
CHAIN = {"a": [0.1, 0.6, 0.3], "b": [0.3, 0.1, 0.6], "c": [0.6, 0.3, 0.1]}
STOP = 0.3
UPDATE_STEPS = 3
UPDATE_LR = 5e-4


def enumerable_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..4 = <|bos|>, <|eos|>, a, b, c; BOS prepended."""
    vocab = {token: i for i, token in enumerate([BOS, EOS, *LETTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, model_max_length=32
    )


def chain_strings(rng: random.Random, count: int, bias_to_c: bool) -> list[list[int]]:
    """Token-id documents ``<|bos|> letters... <|eos|>`` from the Markov chain."""
    docs = []
    for _ in range(count):
        letter = rng.choice(LETTERS)
        ids = [0, 2 + LETTERS.index(letter)]
        while rng.random() > STOP and len(ids) < 12:
            weights = [0.1, 0.1, 0.8] if bias_to_c else CHAIN[letter]
            letter = rng.choices(LETTERS, weights)[0]
            ids.append(2 + LETTERS.index(letter))
        docs.append([*ids, 1])
    return docs


def main() -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tokenizer = enumerable_tokenizer()
    config = LlamaConfig(
        vocab_size=5,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,  # head_dim 32, the smallest vLLM's CPU attention takes
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    train(model, chain_strings(rng, 4000, bias_to_c=False), 300, 3e-3, 20, 1, rng)
    save(model, tokenizer, "enum-p0")
    train(model, chain_strings(rng, 200, bias_to_c=True), UPDATE_STEPS, UPDATE_LR, 1, 1, rng)
    save(model, tokenizer, "enum-p1")


if __name__ == "__main__":
    main()
