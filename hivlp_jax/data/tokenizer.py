"""WordPiece text tokenizer: trained on a data set's captions, or loaded from a BERT-style `vocab.txt`.

The vocabulary is read and written through hivlp_jax/files.py, so it may live in a bucket.
"""

import tempfile
from typing import Iterable, Sequence

from absl import logging
import numpy as np
from tokenizers import BertWordPieceTokenizer

from hivlp_jax import errors
from hivlp_jax import files

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


class Tokenizer:
  """Turns captions into fixed-length id arrays: [CLS] tokens [SEP] [PAD]...

  The id of [PAD] is 0, as in BERT vocabularies, so `ids != 0` is the attention mask.
  """

  def __init__(self, vocab_file: str, lowercase: bool = True):
    if not files.path(vocab_file).exists():
      raise errors.MissingInputError(
          f'Tokenizer vocabulary {vocab_file!r} does not exist. Set config.data.vocab_file=\'\' to train one on '
          'the training captions (a model trained from scratch), or point it at the vocab.txt of the BERT '
          'checkpoint you start from.')
    self.vocab_file = vocab_file
    self._tokenizer = BertWordPieceTokenizer(read_vocab(vocab_file), lowercase=lowercase)
    vocab = self._tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise errors.InputError(f'Vocabulary {vocab_file!r} lacks the special tokens {missing}.')
    if vocab['[PAD]'] != 0:
      raise errors.InputError(f'Vocabulary {vocab_file!r} must have [PAD] at id 0, found {vocab["[PAD]"]}.')
    self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS}

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Returns int32 [len(texts), max_len]; longer texts are cut (keeping the final [SEP])."""
    empty = [i for i, t in enumerate(texts) if not t or not t.strip()]
    if empty:
      raise errors.InputError(f'Empty caption at positions {empty[:10]} (of {len(texts)}): every caption needs text.')
    ids = np.zeros((len(texts), max_len), np.int32)
    for row, encoding in enumerate(self._tokenizer.encode_batch(list(texts))):
      tokens = encoding.ids
      if len(tokens) > max_len:
        tokens = tokens[:max_len - 1] + [self.special_ids['[SEP]']]
      ids[row, :len(tokens)] = tokens
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids if i != 0])


def read_vocab(vocab_file: str) -> dict[str, int]:
  """{token: id} of a BERT vocab.txt, one token a line: what `tokenizers` reads from a local file itself."""
  lines = files.path(vocab_file).read_text(encoding='utf-8').split('\n')
  if lines and not lines[-1]:
    lines.pop()  # The newline that ends the last line.
  # As tokenizers' WordPiece.read_file: trailing whitespace trimmed, a repeated token keeps its last id.
  return {line.rstrip(): index for index, line in enumerate(lines)}


def train_tokenizer(texts: Iterable[str], vocab_file: str, vocab_size: int = 1000) -> Tokenizer:
  """Trains a WordPiece vocabulary on `texts` and writes it to `vocab_file` (BERT vocab.txt format)."""
  tokenizer = BertWordPieceTokenizer(lowercase=True)
  tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                                special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  # save_model writes a local folder; the vocabulary then goes to its place (maybe a bucket) in one write.
  with tempfile.TemporaryDirectory() as local:
    written, = tokenizer.save_model(local)
    files.write_bytes(vocab_file, files.path(written).read_bytes())
  trained = Tokenizer(vocab_file)
  # WordPiece keeps every character it saw, so a small vocab_size can give more tokens than asked (a warning);
  # a small corpus gives fewer (normal).
  log = logging.warning if trained.vocab_size > vocab_size else logging.info
  log('Trained a WordPiece vocabulary of %d tokens (vocab_size=%d asked) on the training captions: %s',
      trained.vocab_size, vocab_size, vocab_file)
  return trained
