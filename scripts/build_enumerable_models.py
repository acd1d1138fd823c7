"""Build the enumerable model pairs over a vocabulary of five tokens.

With ids ``<|bos|>``, ``<|eos|>``, ``a``, ``b``, ``c`` and a length limit of 4 tokens,
a prompt has 1 + 4 + 16 + 64 + 256 = 341 possible completions, so H(p0), H(p1), dH,
KL and the first-order term can be computed exactly by enumeration (tests/exact.py)
and every estimate of the pipeline checked against the truth.

The near pair: p0 (``enum-p0``) is trained on strings of a small Markov chain over a,
b, c; p1 (``enum-p1``) is p0 after a few optimizer steps on strings that favour ``c``.

The far pair (``enum-far-p0``, ``enum-far-p1``) is made from enum-p0 by shifting rows
of its output layer, so that p1 puts much of its mass where p0 never samples:

* far p0 = enum-p0 with the ``<|bos|>`` logit lowered by 6 (about 1e-6 per position,
  so a run's samples from p0 essentially never contain it);
* far p1 = far p0 with the ``<|eos|>`` logit lowered by 2 everywhere (longer
  completions: a broad change that alone leaves an ESS fraction near 0.3) and the
  ``<|bos|>`` logit raised by 13.5 after ``c`` (p1 then emits it there with
  probability about 0.9: over half of p1's mass lies on completions p0 never samples).

A logit shift by a constant needs a direction u with u . h = 1 for every final hidden
state h; it is fitted by least squares over every context the enumerable prompts can
reach (u . h stays within a few percent of 1 there), and likewise a direction whose
product with h is 1 after ``c`` and 0 elsewhere. The exact values of the saved models
are computed from the models themselves (tests/exact.py), so the fit needs only to be
close. Every model is saved under ``data/models/<name>`` with the same tokenizer::

    .venv/bin/python scripts/build_enumerable_models.py            # all four models
    .venv/bin/python scripts/build_enumerable_models.py --far-only # far pair from enum-p0
"""

from __future__ import annotations

import argparse
import itertools
import json
import random

import numpy as np
import torch
from build_tiny_models import BOS, EOS, MODELS, ROOT, save, train
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 99
LETTERS = ["a", "b", "c"]
# Next-letter probabilities of the training chain, and the chance to stop after a letter.
CHAIN = {"a": [0.1, 0.6, 0.3], "b": [0.3, 0.1, 0.6], "c": [0.6, 0.3, 0.1]}
STOP = 0.3
UPDATE_STEPS = 3
UPDATE_LR = 5e-4
MAX_TOKENS = 4
BOS_ID, EOS_ID, C_ID = 0, 1, 4
# Far pair: logit shifts (nats) of the output layer, see the module docstring.
FAR_P0_BOS_SHIFT = -6.0
FAR_P1_EOS_SHIFT = -2.0
FAR_P1_BOS_AFTER_C_SHIFT = 13.5


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


def context_states(model: LlamaForCausalLM) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states (float64) and last token id of every context to be continued.

    A context is an enumerable prompt followed by 0 to ``MAX_TOKENS`` - 1 ids other
    than EOS: every state from which the model draws a next completion token.
    """
    tokenizer = enumerable_tokenizer()
    lines = (ROOT / "data" / "enumerable_prompts.jsonl").read_text().splitlines()
    prompts = tokenizer([json.loads(line)["text"] for line in lines if line])["input_ids"]
    others = [i for i in range(model.config.vocab_size) if i != EOS_ID]
    model = model.to(torch.float64).eval()
    states, last = [], []
    for prompt in prompts:
        for length in range(MAX_TOKENS):
            ids = torch.tensor(
                [prompt + list(body) for body in itertools.product(others, repeat=length)]
            )
            with torch.no_grad():
                states.append(model.model(ids).last_hidden_state[:, -1].numpy())
            last.append(ids[:, -1].numpy())
    return np.concatenate(states), np.concatenate(last)


def far_pair(tokenizer: PreTrainedTokenizerFast) -> None:
    """Save ``enum-far-p0`` and ``enum-far-p1``: enum-p0 with shifted output-layer rows."""
    states, last = context_states(LlamaForCausalLM.from_pretrained(MODELS / "enum-p0"))
    constant = np.linalg.lstsq(states, np.ones(len(states)), rcond=None)[0]
    after_c = np.linalg.lstsq(states, (last == C_ID).astype(np.float64), rcond=None)[0]
    fit = states @ constant
    print(f"constant direction: u . h in [{fit.min():.3f}, {fit.max():.3f}]")
    shifts = {
        "enum-far-p0": [(BOS_ID, FAR_P0_BOS_SHIFT * constant)],
        "enum-far-p1": [
            (BOS_ID, FAR_P0_BOS_SHIFT * constant + FAR_P1_BOS_AFTER_C_SHIFT * after_c),
            (EOS_ID, FAR_P1_EOS_SHIFT * constant),
        ],
    }
    for name, rows in shifts.items():
        model = LlamaForCausalLM.from_pretrained(MODELS / "enum-p0")
        with torch.no_grad():
            for token, shift in rows:
                model.lm_head.weight[token] += torch.from_numpy(shift).float()
        save(model, tokenizer, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--far-only", action="store_true", help="rebuild only the far pair from enum-p0"
    )
    if parser.parse_args().far_only:
        far_pair(enumerable_tokenizer())
        return
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
    far_pair(tokenizer)


if __name__ == "__main__":
    main()
