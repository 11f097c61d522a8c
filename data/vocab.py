"""A vocabulary as other libraries store it: the token strings in id order and, for BPE, the
merges (the transformers and GGUF exports write them next to the weights). GPT-2's token strings
are its byte-level forms ('Ġthe' for ' the'), as encoder.json and vocab.bpe hold them; those two
files come from tiktoken's cache, so an export works offline wherever tiktoken does."""

import json

from data.tokenizer import GPT2_FILES, gpt2_missing, tiktoken_module


def gpt2_file(name):
    """The bytes of one of GPT-2's encoding files ('encoder.json', 'vocab.bpe'), from tiktoken's
    cache or downloaded into it; a one-line DataError when neither works."""
    tiktoken = tiktoken_module()
    try:
        return tiktoken.load.read_file_cached(GPT2_FILES + name)
    except (OSError, ValueError) as e:
        raise gpt2_missing(e) from None


def char_tokens(meta):
    """The characters of a char-level vocabulary, in id order."""
    itos = {int(i): ch for i, ch in meta["itos"].items()}  # JSON keys are strings
    return [itos[i] for i in range(len(itos))]


def gpt2_vocab():
    """GPT-2's BPE: (tokens in id order as byte-level strings, merges as 'a b' in rank order)."""
    encoder = json.loads(gpt2_file("encoder.json"))
    lines = gpt2_file("vocab.bpe").decode("utf-8").split("\n")
    merges = [ln for ln in lines[1:] if ln]  # the first line is '#version: 0.2'
    tokens = sorted(encoder, key=encoder.get)
    assert [encoder[t] for t in tokens] == list(range(len(tokens))), "encoder.json has gaps"
    return tokens, merges
