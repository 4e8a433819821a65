"""A byte-level BPE tokenizer trained locally, for models built from a config (no hub download).

Byte-level so that any text (code with its indentation, newlines, non-ASCII) encodes without <unk> and
decodes back exactly. Special tokens sit at fixed ids so that model configs can hard-code them:
<pad>=0, </s>=1 (eos), <unk>=2, <s>=3 (bos), the T5 layout plus a bos. The tokenizer adds no special
tokens by itself: `dskd.data.collate` appends eos (and bos where a model needs it) explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIAL_TOKENS = [PAD, EOS, UNK, BOS]  # list position = token id


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`, save it to `out_dir` (reload with AutoTokenizer) and return it.

    Deterministic for the same texts in the same order.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{len(SPECIAL_TOKENS) + 256} (4 special tokens + 256 bytes)")
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(token) == token_id, f"{token} must have id {token_id}"

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,  # otherwise decode() rewrites " ." and " ," in code
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
