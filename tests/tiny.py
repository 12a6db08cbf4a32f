"""Tiny offline models and tokenizers for fast tests (no hub, built in well under a second).

The tokenizer is a byte-level BPE with digits split one per token (like SmolLM2 and Qwen) and a
ChatML template, so prompts, supports and tries look like the real thing at toy size.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    from calft.families import FAMILIES  # the prompt vocabulary, so prompts tokenize compactly

    words = " ".join(f"{f.display} {' '.join(f.param_names)}" for f in FAMILIES.values())
    base = (
        "Generate exactly ONE random number from a an distribution with parameters "
        "Output ONLY the number. user assistant system = , . - + 0 1 2 3 4 5 6 7 8 9 "
    )
    return [base + words] * 20


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 400):
    """Train and save a tiny BPE tokenizer with a chat template; returns the HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(path: str | Path, *, tie: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2):
    """Save a randomly initialized tiny LlamaForCausalLM plus the tiny tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path), safe_serialization=True)
    return model, tokenizer


def naive_samples(model, tokenizer, prompt_ids, seeds, max_new_tokens, stops):
    """Sampling oracle: one sample at a time, a full forward over the whole prefix at every step,
    no cache, each step's uniform from the sample's own seed (calft.sampling's protocol)."""
    import numpy as np
    import torch

    from calft.sampling import draw_tokens

    outs = []
    for ss in seeds:
        u = np.random.default_rng(ss).random(max_new_tokens)
        seq, new = list(prompt_ids), []
        for step in range(max_new_tokens):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq])).logits[:, -1]
            t = int(draw_tokens(logits, u[step : step + 1])[0])
            if t in stops:
                break
            new.append(t)
            seq.append(t)
        outs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outs
