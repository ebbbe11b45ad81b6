"""Tokenizers for CLIP text: trained on a dataset's captions with `tokenizers`, or loaded from a folder.

A trained tokenizer is wrapped as a `PreTrainedTokenizerFast`, so it saves beside the model and loads with
`AutoTokenizer.from_pretrained`, like any CLIP tokenizer on the Hub.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
# Order gives ids 0..3. The end-of-text id must not be 2: transformers' CLIP text model reads id 2 as a
# legacy config and pools at the largest token id instead of at the end-of-text token.
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, max_length: int = 77) -> PreTrainedTokenizerFast:
    """Byte-level BPE on lower-cased captions, framed as `<|startoftext|> … <|endoftext|>` like CLIP's."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)
