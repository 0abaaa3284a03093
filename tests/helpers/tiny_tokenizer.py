"""A tiny byte-level BPE tokenizer for tests, saved the way HF and llama.cpp save theirs.

``make_tiny_tokenizer`` trains a deterministic BPE on a built-in text with the
``tokenizers`` trainer; ``save_hf_tokenizer`` writes it as a Hugging Face
directory and ``write_gguf_tokenizer_metadata`` writes the ``tokenizer.ggml.*``
keys llama.cpp's converter writes for a gpt2-kind vocabulary.
``make_tiny_sentencepiece`` and ``write_gguf_sentencepiece_metadata`` do the
same for a Llama-style SentencePiece vocabulary.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import gguf
import sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = SPECIAL_TOKENS  # ids 0, 1, 2, as in SmolLM2-Instruct
PAD_TOKEN = EOS_TOKEN

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The river wound slowly through the valley, past the old mill and the stone bridge
that the villagers had built three hundred years ago. In the mornings, fishermen
sat along its banks with their long poles and patient faces, waiting for the
trout to rise. Children ran down the hill after school, shouting and laughing,
and threw flat pebbles that skipped across the water before sinking out of sight.

A language model reads text as a sequence of tokens. Each token is a piece of a
word, a whole word, a number, or a mark of punctuation. The model predicts the
next token from the ones before it, again and again, until it writes a stop
token or reaches the maximum length. Serving many requests at once means
sharing the memory of the attention cache between them, one block at a time.

Winter arrived early that year. Frost painted the windows in feathery patterns,
the orchard stood silent under a quilt of snow, and smoke curled from every
chimney in the village. Grandmother baked bread with honey, cinnamon and walnuts
while the kettle whistled; neighbours gathered around the kitchen table to trade
stories about journeys, storms, forgotten treasures and mysterious travellers.
Quickly, the jovial wizard mixed seventeen bizarre potions: amber, crimson,
violet, emerald, golden, silver, turquoise and obsidian, each glowing brightly.
Scientists measure temperature, pressure, velocity and acceleration carefully;
engineers design bicycles, aeroplanes, submarines, telescopes and lighthouses.
Philosophy questions knowledge, justice, beauty, friendship and responsibility.
Hungry zebras jumped over lazy yellow foxes beneath extraordinary thunderclouds.

She asked, "Where are you going?" He answered: "To the market, then home."
It's late; we'll see what they've done. I'm sure you'd agree, wouldn't you?
def add(a, b):
    return a + b  # the sum of two numbers
print(add(2, 3)) -> 5; x = [1, 2, 3]; y = {"key": "value"}
0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2025-01-31 12:30:45 $19.99 50% #7
! ? . , ; : ' " ( ) [ ] { } < > / \\ | _ - + = * & ^ % $ # @ ~ `
"""


def make_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A GPT-2 style byte-level BPE of exactly ``vocab_size`` tokens.

    Ids 0, 1, 2 are the special tokens ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``; 256 byte tokens follow, then the learned merges. The same
    size always gives the same tokenizer. The built-in text supports sizes up
    to 1041.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise ValueError(f"the training text only supports {actual} tokens, {vocab_size} were asked for")
    return tokenizer


def ordered_vocab(tokenizer: Tokenizer) -> list[str]:
    """Token strings by id."""
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    return [by_id[i] for i in range(len(by_id))]


def bpe_merges(tokenizer: Tokenizer) -> list[str]:
    """The merges as ``"left right"`` strings, highest priority first."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def save_hf_tokenizer(directory: str | Path, tokenizer: Tokenizer, chat_template: str | None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` as transformers saves them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": 2048,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": UNK_TOKEN,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def write_gguf_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Tokenizer,
                                  chat_template: str | None) -> None:
    """The ``tokenizer.ggml.*`` keys llama.cpp's converter writes for a gpt2-kind vocab."""
    tokens = ordered_vocab(tokenizer)
    special = set(SPECIAL_TOKENS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(bpe_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.token_to_id(BOS_TOKEN))
    writer.add_eos_token_id(tokenizer.token_to_id(EOS_TOKEN))
    writer.add_unk_token_id(tokenizer.token_to_id(UNK_TOKEN))
    writer.add_pad_token_id(tokenizer.token_to_id(PAD_TOKEN))
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def make_tiny_sentencepiece(vocab_size: int = 400) -> sentencepiece.SentencePieceProcessor:
    """A SentencePiece BPE model (Llama style: byte fallback, split digits, dummy prefix)
    trained on the built-in text; ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>``."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def write_gguf_sentencepiece_metadata(writer: gguf.GGUFWriter, processor: sentencepiece.SentencePieceProcessor,
                                      chat_template: str | None) -> None:
    """The ``tokenizer.ggml.*`` keys llama.cpp's converter writes for a SentencePiece vocab."""
    size = processor.get_piece_size()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([processor.id_to_piece(i) for i in range(size)])
    writer.add_token_scores([processor.get_score(i) for i in range(size)])
    writer.add_token_types([_sentencepiece_token_type(processor, i) for i in range(size)])
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _sentencepiece_token_type(processor: sentencepiece.SentencePieceProcessor, token_id: int) -> gguf.TokenType:
    if processor.is_unknown(token_id):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(token_id):
        return gguf.TokenType.CONTROL
    if processor.is_byte(token_id):
        return gguf.TokenType.BYTE
    if processor.is_unused(token_id):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL


def write_tokenizer_gguf(path: str | Path, write_metadata, *args) -> Path:
    """A GGUF file holding only tokenizer metadata: ``write_metadata(writer, *args)``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    write_metadata(writer, *args)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
