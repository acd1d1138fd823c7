"""Build the tiny demo models p0 and p1 that the default run and the tests use.

Everything comes from text the repository ships (``data/corpus/``, written by
``scripts/make_corpus.py``), so nothing is downloaded:

1. a byte-level BPE tokenizer (512 ids, with ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and
   a small chat template) is trained on ``stories.txt``;
2. p0, a Llama-architecture model of about half a million parameters, is trained on
   ``stories.txt`` with AdamW until its per-token loss is low, so its entropies mean
   something;
3. p1 is p0 after a few more optimizer steps on ``update.txt`` (a narrower register of
   the same stories): a genuine update whose entropy change is clearly measurable while
   importance weights p1/p0 stay well behaved.

Both are saved in float32 safetensors under ``data/models/tiny-p0`` and
``data/models/tiny-p1`` with the tokenizer beside each. The result is committed, so
this script runs only when the models are to be rebuilt::

    .venv/bin/python scripts/build_tiny_models.py
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.cache import publish_folder

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"
MODELS = ROOT / "data" / "models"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 512
# Plain-text chat turns; the model never saw chat data, but prompts given as
# messages exercise the same rendering path a real chat model uses.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
SEED = 1234
# The p1 update: enough to move the entropy by over half a nat per sequence while the
# importance weights p1/p0 keep an ESS fraction well above 0.5.
UPDATE_STEPS = 4
UPDATE_LR = 2e-4


def train_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that prepends ``<|bos|>`` to every text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> list[list[int]]:
    """``<|bos|> text <|eos|>`` per line, so the model learns where a story ends."""
    return [[*ids, tokenizer.eos_token_id] for ids in tokenizer(lines)["input_ids"]]


def batches(
    docs: list[list[int]], batch_size: int, pad_id: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless padded batches of whole documents (labels -100 on padding)."""
    while True:
        chosen = rng.sample(docs, batch_size)
        width = max(len(d) for d in chosen)
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, doc in enumerate(chosen):
            input_ids[row, : len(doc)] = torch.tensor(doc)
            labels[row, : len(doc)] = torch.tensor(doc)
            mask[row, : len(doc)] = 1
        yield input_ids, labels, mask


def train(
    model: LlamaForCausalLM,
    docs: list[list[int]],
    steps: int,
    lr: float,
    warmup_steps: int,
    pad_id: int,
    rng: random.Random,
) -> float:
    """AdamW on whole documents; returns the mean loss of the last 20 steps (nats/token)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps)
    )
    model.train()
    recent: list[float] = []
    for step, (input_ids, labels, mask) in zip(
        range(steps), batches(docs, 32, pad_id, rng), strict=False
    ):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = [*recent, loss.item()][-20:]
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f} nats/token", flush=True)
    model.eval()
    return sum(recent) / len(recent)


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, name: str) -> None:
    """Write model and tokenizer to ``data/models/<name>``, replacing it atomically."""

    def build(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for path in folder.iterdir():
            path.chmod(0o644)  # the committed files' mode, whatever the umask

    publish_folder(MODELS / name, build, replace=True)


def main() -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    stories = (CORPUS / "stories.txt").read_text().splitlines()
    update = (CORPUS / "update.txt").read_text().splitlines()

    tokenizer = train_tokenizer(stories)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: the smallest that vLLM's CPU attention takes
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    print(f"p0: {sum(p.numel() for p in model.parameters()):,} parameters")
    loss = train(
        model, encode_documents(tokenizer, stories), 800, 3e-3, 50, tokenizer.pad_token_id, rng
    )
    print(f"p0 final loss {loss:.4f} nats/token")
    save(model, tokenizer, "tiny-p0")

    loss = train(
        model,
        encode_documents(tokenizer, update),
        UPDATE_STEPS,
        UPDATE_LR,
        1,
        tokenizer.pad_token_id,
        rng,
    )
    print(f"p1 update loss {loss:.4f} nats/token")
    save(model, tokenizer, "tiny-p1")


if __name__ == "__main__":
    main()
