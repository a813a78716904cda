"""Shared fixtures: tiny language models built from configs (no download)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders find interpretable features in language model activations.",
    "A dictionary of features is learned so that each activation is a sparse sum of them.",
    "Residual streams carry information between the layers of a transformer.",
] * 40


def _tokenizer(directory: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>", "<pad>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(directory: str, arch: str):
    """Save a tiny randomly initialised `arch` model and its tokenizer to `directory`."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM,
                              GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    tok = _tokenizer(directory)
    vocab = len(tok)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gpt_neo":
        cfg = GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=4, num_heads=4,
                           attention_types=[[["global", "local"], 2]], max_position_embeddings=128,
                           window_size=16, intermediate_size=64)
        model = GPTNeoForCausalLM(cfg)
    elif arch == "gptj":
        cfg = GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                         rotary_dim=4, n_inner=64)
        model = GPTJForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_gpt2")), "gpt2")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    import json
    with open(path, "w") as f:
        for text in CORPUS_TEXT:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def trained_tiny_gpt2(model_dir, out_dir):
    """The tiny GPT-2 after 150 Adam steps on the test corpus: its predictions now depend on
    its residual stream (a random one predicts ~uniformly whatever the activations)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor(tok(" ".join(CORPUS_TEXT[:40]))["input_ids"][:512]).view(16, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def trained_gpt2(tiny_gpt2, tmp_path_factory):
    return trained_tiny_gpt2(tiny_gpt2, str(tmp_path_factory.mktemp("trained_gpt2")))
