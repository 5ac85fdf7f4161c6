"""01_tokenizer.py: from text to token ids, the byte-level BPE of GPT-2, from scratch.

A model reads integers, not text. A tokenizer turns text into a list of ids and back. This
stage builds two:

1. CharTokenizer: one id per character. Tiny vocabulary (65 for Shakespeare), long sequences,
   cannot encode a character it has not seen. The "hello world" that 05 trains on.
2. BPETokenizer: byte-level byte pair encoding (BPE), the tokenizer of GPT-2 (and, with other
   merge lists, of GPT-3/4, Llama 3, ...). It starts from the 256 byte values, so it can encode
   ANY text, then learns merges: "the most frequent adjacent pair of tokens becomes a new token",
   repeated until the vocabulary is full. Common words end up as one token, rare ones as pieces.

Three details make it GPT-2's BPE and not just any BPE:
- a regex pre-split: text is first cut into chunks ("Hello", " world", "!", "'s", " 2024")
  and merges never cross a chunk boundary, so " dog" never fuses with a following ".";
- the byte-to-unicode table, which gives each of the 256 bytes a printable character so that
  vocab.bpe and encoder.json are readable text files ("Ġ" is the space byte);
- special tokens: "<|endoftext|>" = 50256 separates documents. Text that merely *contains* that
  string must not silently become the special token, so encode raises unless you allow it.

We train BPE twice: a naive trainer that recounts every pair in the corpus at every merge (the
textbook loop), and a fast one that counts each distinct chunk once and, after a merge, updates
only the pair counts that the merge changed. Then we load OpenAI's merges and check that our
encoder gives exactly tiktoken's ids (tests/test_01_tokenizer.py does so on all of tiny
Shakespeare).

References: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"
(BPE for NLP); Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", 2.2
(byte-level BPE); openai/gpt-2 src/encoder.py; openai/tiktoken; karpathy/minbpe.

Run (CPU only, nothing here needs a GPU):
    python 01_tokenizer.py --help
    python 01_tokenizer.py train data/tinyshakespeare.txt --vocab-size 1024 --out out/bpe.json
    python 01_tokenizer.py encode "Hello world, it's 2024!"          # GPT-2 (our encoder)
    python 01_tokenizer.py encode --tokenizer out/bpe.json "To be, or not to be"
    python 01_tokenizer.py decode 15496 995
    python 01_tokenizer.py bench                                      # trainers and encoders
"""

import argparse
import hashlib
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path

import regex  # the `regex` module, not `re`: the GPT-2 pattern needs \p{L} (any letter) and \p{N}
import requests

DATA_DIR = Path(__file__).resolve().parent / "data"

_GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
GPT2_FILES = {  # filename -> (url, sha256); the hashes are the ones tiktoken checks
    "encoder.json": (f"{_GPT2_URL}/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (f"{_GPT2_URL}/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
SHAKESPEARE = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
               "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")

# -----------------------------------------------------------------------------
# The pieces later scripts copy: a character tokenizer, a factory, a safe download


class CharTokenizer:
    """One token per character: the simplest tokenizer (vocabulary = the characters seen).

    >>> tok = CharTokenizer.from_text("hello")      # vocabulary "ehlo": e=0, h=1, l=2, o=3
    >>> tok.encode("hole"), tok.decode([2, 0])
    ([1, 3, 2, 0], 'le')
    """

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters; build it with CharTokenizer.from_text(text)")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = dict(enumerate(chars))
        self.n_vocab = len(chars)
        self.eot_token = None  # no end-of-text token: 05 trains on one continuous text

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; build the tokenizer "
                             "from text that contains it (CharTokenizer.from_text)") from None

    def decode(self, ids) -> str:
        try:
            return "".join([self.itos[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary "
                             f"(ids are 0..{self.n_vocab - 1})") from None

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


def get_tokenizer(spec: dict):
    """{"kind": "char", "chars": ...} -> CharTokenizer; {"kind": "gpt2"} -> tiktoken's GPT-2.

    Checkpoints store this small dict, not the tokenizer. For GPT-2 we use tiktoken (Rust, fast);
    BPETokenizer below gives the same ids and shows how they are made.
    """
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        import tiktoken  # imported here so that char-only scripts do not need it

        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {kind!r}; use {{'kind': 'char', 'chars': ...}} "
                     "or {'kind': 'gpt2'}")


def download(url: str, path, sha256: str, timeout=30) -> Path:
    """Download url to path: streamed, sha256-checked, written to path.tmp then renamed.

    A file that is already there with the right hash is not downloaded again. On an HTTP error
    or a hash mismatch we raise and leave no file behind, so a half-written download can never
    be mistaken for the real one.
    """
    path = Path(path)
    if path.exists():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() == sha256:
            return path
        path.unlink()  # corrupt or outdated: never leave it where a good file is expected
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0))
            done = 0
            with open(tmp, "wb") as f:
                for block in response.iter_content(chunk_size=1 << 20):
                    f.write(block)
                    digest.update(block)
                    done += len(block)
                    if total > 1 << 24:  # progress only for big files (> 16 MB)
                        print(f"\r{path.name}: {done / 2**20:.0f}/{total / 2**20:.0f} MB", end="", flush=True)
            if total > 1 << 24:
                print()
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}; "
                             "retry; if it persists the file changed upstream: check it and update the hash, "
                             f"or put the expected file in {path.parent} by hand")
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {e}; check the URL and your network, "
                           f"or put the file (sha256 {sha256}) in {path.parent} by hand") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -----------------------------------------------------------------------------
# Bytes and the pre-split


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> printable character, so that every token is readable text.

    Printable bytes map to themselves ("a" -> "a"); the other 68 (control bytes, space, ...)
    map to unused characters from U+0100 on, in order: space (0x20) -> "Ġ", "\\n" -> "Ċ".
    That is why GPT-2's vocab.bpe is full of "Ġthe" (= " the").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


# GPT-2's pre-split, in tiktoken's form. The original (openai/gpt-2 encoder.py) is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# tiktoken's version matches exactly the same chunks; its possessive ++ (no backtracking) and
# \s++$ make it faster. Alternatives, tried left to right at each position:
#   a contraction ('s 't 're 've 'm 'll 'd), an optional space + letters, an optional space +
#   digits, an optional space + other symbols; then whitespace, split so that the last space
#   before a word stays with the word ("a   b" -> "a", "  ", " b").
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# -----------------------------------------------------------------------------
# BPE, the two operations everything else is built from


def get_stats(ids: list[int], counts: dict | None = None) -> dict:
    """Count adjacent pairs, into counts if given: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace each occurrence of pair by idx, left to right: ([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4].

    subtle: occurrences may overlap ([5, 5, 5] with (5, 5)); the leftmost wins -> [idx, 5].
    """
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def best_pair(stats: dict) -> tuple[int, int]:
    """The most frequent pair; a tie goes to the smallest pair, so that both trainers agree exactly."""
    return min(stats, key=lambda pair: (-stats[pair], pair))


def _no_pairs_left(n_done: int) -> ValueError:
    return ValueError(f"the text has no pair left to merge after {n_done} merges; "
                      f"use a smaller vocab_size (at most {257 + n_done}) or more text")


# -----------------------------------------------------------------------------
# Training, the naive way: recount every pair of the corpus at every merge


def train_bpe_naive(text: str, n_merges: int, pattern: str = GPT2_SPLIT_PATTERN, verbose=False) -> dict:
    """Learn n_merges merges; returns {pair: new id} in the order they were learned.

    The textbook loop: count all pairs, merge the best one everywhere, repeat. Each merge costs a
    pass over the whole corpus, so this is O(n_merges * len(text)): fine for a page, tens of
    seconds for 100 KB. Kept as the reference that train_bpe must agree with.
    """
    chunks = [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, text)]
    merges = {}
    for i in range(n_merges):
        stats = {}
        for ids in chunks:
            get_stats(ids, stats)
        if not stats:
            raise _no_pairs_left(i)
        pair, idx = best_pair(stats), 256 + i
        chunks = [merge(ids, pair, idx) for ids in chunks]
        merges[pair] = idx
        if verbose:
            print(f"merge {i + 1}/{n_merges}: {pair} -> {idx} ({stats[pair]} occurrences)")
    return merges


# -----------------------------------------------------------------------------
# Training, the fast way: count once, then update only what a merge changes


def train_bpe(text: str, n_merges: int, pattern: str = GPT2_SPLIT_PATTERN, verbose=False) -> dict:
    """Same result as train_bpe_naive (tests check it), without rescanning the corpus.

    Three ideas:
    1. Work on distinct chunks with their counts. Tiny Shakespeare is ~300k chunks but only ~15k
       distinct ones (" the" appears 5k times), so we count each once, weighted.
    2. Keep the global pair counts, plus an index pair -> chunks that contain it. A merge of
       (a, b) only touches those chunks: for each one we subtract the counts of its old pairs
       and add those of its new pairs. Nothing else in the corpus changes.
    3. Find the best pair with a heap of (-count, pair). A count that changed gets a new entry;
       old entries are left in place and skipped when popped ("lazy deletion"): an entry is
       current only if its count equals the count we hold now.
    """
    chunk_counts = Counter(regex.findall(pattern, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # the distinct chunks, as ids
    counts = list(chunk_counts.values())  # how often each occurs
    stats = defaultdict(int)  # pair -> count in the whole corpus
    where = defaultdict(set)  # pair -> indices of the words that contain it (may hold stale ones)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            stats[pair] += counts[w]
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in stats.items()]
    heapq.heapify(heap)  # ties: smallest pair first, like best_pair

    merges = {}
    for i in range(n_merges):
        while heap and stats.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)  # outdated entry: its pair's count changed since it was pushed
        if not heap:
            raise _no_pairs_left(i)
        count, pair = heapq.heappop(heap)
        idx = 256 + i
        merges[pair] = idx
        delta = defaultdict(int)  # pair -> change of its count caused by this merge
        for w in where.pop(pair):
            ids, n = words[w], counts[w]
            new_ids = merge(ids, pair, idx)
            if len(new_ids) == len(ids):
                continue  # stale index entry: an earlier merge already removed the pair here
            for p in zip(ids, ids[1:]):
                delta[p] -= n
            for p in zip(new_ids, new_ids[1:]):
                delta[p] += n
                where[p].add(w)
            words[w] = new_ids
        for p, d in delta.items():
            if d:  # pairs far from the merge are subtracted and added back: no change, no push
                stats[p] += d
                if stats[p]:
                    heapq.heappush(heap, (-stats[p], p))
                else:
                    del stats[p]
        if verbose:
            print(f"merge {i + 1}/{n_merges}: {pair} -> {idx} ({-count} occurrences)")
    return merges


# -----------------------------------------------------------------------------
# The tokenizer: encode, decode, save/load, and OpenAI's GPT-2 merges


class _ChunkCache(dict):
    """A dict that fills itself: cache[chunk] runs BPE the first time, then is one lookup.

    Text is Zipfian: a few thousand distinct chunks make up most of any text (tiny Shakespeare:
    300k chunks, 15k distinct), so almost every lookup is a hit. Cleared when full so that
    memory stays bounded.
    """

    def __init__(self, bpe, max_size=500_000):
        super().__init__()
        self.bpe, self.max_size = bpe, max_size

    def __missing__(self, chunk: str) -> list[int]:
        if len(self) >= self.max_size:
            self.clear()
        ids = self[chunk] = self.bpe(chunk)
        return ids


class BPETokenizer:
    """Byte-level BPE: merges (pair -> new id) + special tokens.

    A merge's new id is also its priority: merges learned earlier have smaller ids and are
    applied first (true of our trainers and of GPT-2, where merge i makes id 256 + i).
    byte_ids[b] is the id of the single byte b: b itself for our trained tokenizers, GPT-2's
    own order for OpenAI's (where "!" is 0 and the space byte is 220).
    """

    def __init__(self, merges: dict, special_tokens: dict | None = None, byte_ids=None,
                 pattern: str = GPT2_SPLIT_PATTERN):
        self.merges = dict(sorted(merges.items(), key=lambda item: item[1]))  # in the order they apply
        self.special_tokens = dict(special_tokens or {})  # "<|endoftext|>" -> id
        self.byte_ids = list(range(256) if byte_ids is None else byte_ids)
        self.pattern = pattern
        self.vocab = {idx: bytes([b]) for b, idx in enumerate(self.byte_ids)}  # id -> bytes
        try:
            for (a, b), idx in self.merges.items():
                self.vocab[idx] = self.vocab[a] + self.vocab[b]
        except KeyError as e:
            raise ValueError(f"merge uses token {e.args[0]} before it exists; merges must build on "
                             "bytes and on merges with smaller ids") from None
        self.vocab.update({idx: s.encode("utf-8") for s, idx in self.special_tokens.items()})
        if sorted(self.vocab) != list(range(256 + len(self.merges) + len(self.special_tokens))):
            raise ValueError("token ids must be 0..n_vocab-1, each used once; check merges, byte_ids and "
                             "special_tokens")
        self.n_vocab = len(self.vocab)
        self.eot_token = self.special_tokens.get("<|endoftext|>")
        self.pattern_re = regex.compile(pattern)
        specials = set(self.special_tokens.values())
        # bytes -> id of every ordinary token, for the whole-chunk shortcut in _bpe
        self._token_ids = {token: idx for idx, token in self.vocab.items() if idx not in specials}
        self._cache = _ChunkCache(self._bpe)

    # -- training -------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, verbose=False, naive=False) -> "BPETokenizer":
        """Learn vocab_size - 257 merges on text; the last id is "<|endoftext|>" (as in GPT-2:
        50257 = 256 bytes + 50000 merges + 1 special)."""
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
        merges = (train_bpe_naive if naive else train_bpe)(text, vocab_size - 257, verbose=verbose)
        return cls(merges, {"<|endoftext|>": vocab_size - 1})

    # -- encoding -------------------------------------------------------------

    def apply_merges(self, ids: list[int]) -> list[int]:
        """BPE proper: repeatedly merge the adjacent pair that was learned first, until none is left.

        GPT-2 on " there": [Ġ t h e r e] -> [Ġt h e r e] -> [Ġt he r e] -> [Ġt he re] -> [Ġthe re]
        -> [Ġthere]. Merges apply in the order they were learned, not left to right.
        """
        ids = list(ids)
        merges, never = self.merges, self.n_vocab  # `never`: larger than any id, = "not a merge"
        # ranks[i]: what the pair (ids[i], ids[i + 1]) merges into, which is also its priority
        ranks = [merges.get(pair, never) for pair in zip(ids, ids[1:])]
        while ranks:
            new = min(ranks)
            if new == never:
                break  # no pair left that we know how to merge
            i = ranks.index(new)  # the leftmost occurrence; the loop comes back for the others
            ids[i:i + 2] = [new]
            # only the pairs next to the new token changed: update those instead of recomputing all
            del ranks[i]
            if i < len(ranks):
                ranks[i] = merges.get((new, ids[i + 1]), never)
            if i > 0:
                ranks[i - 1] = merges.get((ids[i - 1], new), never)
        return ids

    def _bpe(self, chunk: str) -> list[int]:
        """The ids of one pre-split chunk (what the cache calls on a miss)."""
        data = chunk.encode("utf-8")
        if (idx := self._token_ids.get(data)) is not None:
            # the chunk is itself a token: BPE would end there too, so skip it (tiktoken does the
            # same; a test checks that this shortcut changes nothing for GPT-2)
            return [idx]
        return self.apply_merges([self.byte_ids[b] for b in data])

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as ordinary text (tiktoken's encode_ordinary)."""
        text = _replace_surrogates(text)
        chunks = self.pattern_re.findall(text)  # "Hello world!" -> ["Hello", " world", "!"]
        # one cache lookup per chunk, flattened; map/chain keep the loop in C, which matters here
        return list(chain.from_iterable(map(self._cache.__getitem__, chunks)))

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        """Encode text; special tokens are recognised only when allowed, as in tiktoken.

        allowed_special: "none_raise" (default: text containing a special token raises, because
        a user typing "<|endoftext|>" must not be able to end your document), "all", or a set.
        To encode special-token strings as plain text, use encode_ordinary.
        """
        specials = set(self.special_tokens)
        if allowed_special == "all":
            allowed = specials
        elif allowed_special == "none_raise":
            allowed = set()
        elif isinstance(allowed_special, (set, frozenset)):
            allowed = set(allowed_special)
            if allowed - specials:
                raise ValueError(f"unknown special tokens {sorted(allowed - specials)}; "
                                 f"this tokenizer has {sorted(specials)}")
        else:
            raise ValueError(f"allowed_special must be 'none_raise', 'all' or a set, got {allowed_special!r}")
        if found := [token for token in specials - allowed if token in text]:
            token = min(found, key=text.index)  # the first one in the text, as tiktoken reports
            raise ValueError(f"Encountered text corresponding to disallowed special token {token!r}.\n"
                             "If you want this text to be encoded as a special token, pass it to "
                             f"`allowed_special`, e.g. `allowed_special={{{token!r}}}` (or 'all').\n"
                             "If you want it encoded as normal text, use `encode_ordinary`.")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        # split keeps the separators because of the capture group: "a<|endoftext|>b" ->
        # ["a", "<|endoftext|>", "b"]; the special tokens are at the odd positions
        for i, part in enumerate(_special_regex(allowed).split(text)):
            ids.extend(self.encode_ordinary(part) if i % 2 == 0 else [self.special_tokens[part]])
        return ids

    # -- decoding -------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary "
                             f"(ids are 0..{self.n_vocab - 1})") from None

    def decode(self, ids) -> str:
        """ids -> text. A token can end in the middle of a UTF-8 character (GPT-2 has tokens for
        half an emoji), so some id lists are not valid UTF-8: like tiktoken, those bytes become
        U+FFFD "�" instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- save / load: readable JSON -------------------------------------------

    def save(self, path) -> Path:
        """Write the tokenizer as JSON a person can read: tokens use GPT-2's printable byte
        characters ("Ġthe" = " the"); merges are [a, b, new id]."""
        show = bytes_to_unicode()
        data = {
            "kind": "bpe",
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": {idx: "".join(show[b] for b in self.vocab[idx]) for idx in sorted(self.vocab)
                      if idx not in self.special_tokens.values()},
            "merges": [[a, b, idx] for (a, b), idx in self.merges.items()],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, ensure_ascii=False, indent=1)
        text = regex.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)  # one merge per line
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("kind") != "bpe":
            raise ValueError(f"{path} is not a BPETokenizer file (no \"kind\": \"bpe\"); "
                             "write one with BPETokenizer.save or `python 01_tokenizer.py train`")
        unshow = {ch: b for b, ch in bytes_to_unicode().items()}
        byte_ids = [0] * 256
        for idx, token in data["vocab"].items():
            if len(token) == 1:
                byte_ids[unshow[token]] = int(idx)
        merges = {(a, b): idx for a, b, idx in data["merges"]}
        return cls(merges, data["special_tokens"], byte_ids, data["pattern"])

    @classmethod
    def from_gpt2(cls, encoder_json, vocab_bpe) -> "BPETokenizer":
        """OpenAI's GPT-2 tokenizer from its two files.

        encoder.json: token (printable form) -> id, 50,257 entries, "<|endoftext|>" = 50256.
        vocab.bpe: a "#version" line, then the 50,000 merges in order, one "a b" per line,
        e.g. "Ġ t" (merge 0: " " + "t" -> " t"), "Ġ a", "h e", ...
        """
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
        special_tokens = {"<|endoftext|>": encoder.pop("<|endoftext|>")}
        show = bytes_to_unicode()
        try:
            byte_ids = [encoder[show[b]] for b in range(256)]
            merges = {}
            for line in filter(None, lines):
                a, b = line.split(" ")
                merges[encoder[a], encoder[b]] = encoder[a + b]
        except (KeyError, ValueError) as e:
            raise ValueError(f"{encoder_json} and {vocab_bpe} do not match ({e!r}); "
                             "download both again (see GPT2_FILES)") from e
        return cls(merges, special_tokens, byte_ids)


def _special_regex(tokens) -> "regex.Pattern":
    """A pattern matching any of the given special tokens (longest first), as one capture group."""
    return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def _replace_surrogates(text: str) -> str:
    """Lone surrogates ("\\ud800", e.g. from a broken JSON escape) have no UTF-8 encoding; like
    tiktoken, we re-read the text as UTF-16 so that they become U+FFFD and pairs become their
    character."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def gpt2(data_dir=DATA_DIR) -> BPETokenizer:
    """Our GPT-2 tokenizer, downloading encoder.json and vocab.bpe into data_dir if needed."""
    paths = [download(url, Path(data_dir) / name, sha256) for name, (url, sha256) in GPT2_FILES.items()]
    return BPETokenizer.from_gpt2(*paths)


# -----------------------------------------------------------------------------
# Benchmarks: python 01_tokenizer.py bench


def _timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def bench_train(text: str, vocab_size: int, naive_chars: int) -> None:
    """Our trainer against the naive one on the first naive_chars of text, then ours on all of it."""
    n_merges, head = vocab_size - 257, text[:naive_chars]
    naive_merges, naive_s = _timed(train_bpe_naive, head, n_merges)
    fast_merges, fast_s = _timed(train_bpe, head, n_merges)
    _, full_s = _timed(train_bpe, text, n_merges)
    print(f"\nBPE training to vocab {vocab_size} ({n_merges} merges + <|endoftext|>)")
    print(f"{'trainer':<20} {'text bytes':>11} {'seconds':>8} {'ms/merge':>9} {'speedup':>8}")
    for name, sample, seconds in [("naive (recount)", head, naive_s), ("ours (incremental)", head, fast_s),
                                  ("ours (incremental)", text, full_s)]:
        speedup = f"{naive_s / seconds:.1f}x" if sample is head else "-"
        print(f"{name:<20} {len(sample.encode('utf-8')):>11,} {seconds:>8.2f} "
              f"{1000 * seconds / n_merges:>9.2f} {speedup:>8}")
    print(f"same merges as the naive trainer: {fast_merges == naive_merges}")


def bench_encode(text: str, data_dir) -> None:
    """Bytes/s of our GPT-2 encoder (cold cache, then warm) against tiktoken on the same text."""
    import tiktoken

    n_bytes = len(text.encode("utf-8"))
    ours, reference = gpt2(data_dir), tiktoken.get_encoding("gpt2")
    reference.encode("warm up")  # tiktoken builds its regex lazily
    expected, tiktoken_s = _timed(reference.encode, text)
    print(f"\nGPT-2 encode of {n_bytes:,} bytes")
    print(f"{'encoder':<18} {'seconds':>8} {'MB/s':>7} {'time / tiktoken':>16} {'same ids':>9}")
    rows = [("tiktoken (Rust)", tiktoken_s, expected)]
    for name in ["ours, cold cache", "ours, warm cache"]:  # the first run fills the chunk cache
        ids, seconds = _timed(ours.encode, text)
        rows.append((name, seconds, ids))
    for name, seconds, ids in rows:
        print(f"{name:<18} {seconds:>8.3f} {n_bytes / seconds / 1e6:>7.2f} "
              f"{seconds / tiktoken_s:>15.2f}x {str(ids == expected):>9}")


# -----------------------------------------------------------------------------
# Command line


def _load_tokenizer(name: str) -> BPETokenizer:
    return gpt2() if name == "gpt2" else BPETokenizer.load(name)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Byte-level BPE from scratch: train, encode, decode, bench.",
        epilog="examples:\n"
               "  python 01_tokenizer.py train data/tinyshakespeare.txt --vocab-size 1024\n"
               "  python 01_tokenizer.py encode \"Hello world, it's 2024!\"\n"
               "  python 01_tokenizer.py decode 15496 995\n"
               "  python 01_tokenizer.py bench",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="learn a BPE vocabulary from a text file")
    p.add_argument("file", help="UTF-8 text file, e.g. data/tinyshakespeare.txt")
    p.add_argument("--vocab-size", type=int, default=1024, help="256 bytes + merges + <|endoftext|>")
    p.add_argument("--out", default="out/bpe.json", help="where to write the tokenizer (JSON)")
    p.add_argument("--naive", action="store_true", help="use the recount-every-merge trainer (slow)")
    p.add_argument("--verbose", action="store_true", help="print every merge")
    p = sub.add_parser("encode", help="text -> ids")
    p.add_argument("text")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (OpenAI's merges) or a JSON file from train")
    p.add_argument("--allow-special", action="store_true", help="encode <|endoftext|> as the special token")
    p = sub.add_parser("decode", help="ids -> text")
    p.add_argument("ids", type=int, nargs="+")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (OpenAI's merges) or a JSON file from train")
    p = sub.add_parser("bench", help="time the trainers and the encoders (prints two tables)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--naive-chars", type=int, default=100_000, help="the naive trainer's text (it is slow)")
    p.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args(argv)

    if args.command == "train":
        text = Path(args.file).read_text(encoding="utf-8")
        t0 = time.perf_counter()
        tok = BPETokenizer.train(text, args.vocab_size, verbose=args.verbose, naive=args.naive)
        print(f"trained {args.vocab_size - 257} merges in {time.perf_counter() - t0:.2f} s; "
              f"wrote {tok.save(args.out)}")
        sample = text[:100_000]
        ratio = len(sample.encode("utf-8")) / len(tok.encode_ordinary(sample))
        print(f"compression on the first 100k characters: {ratio:.2f} bytes/token")
    elif args.command == "encode":
        tok = _load_tokenizer(args.tokenizer)
        try:
            ids = tok.encode(args.text, allowed_special="all" if args.allow_special else "none_raise")
        except ValueError as e:
            parser.error(f"{str(e).splitlines()[0]} Add --allow-special to encode it as the special token.")
        print(ids)
        print(" | ".join(repr(tok.decode([i])) for i in ids))
    elif args.command == "decode":
        print(_load_tokenizer(args.tokenizer).decode(args.ids))
    elif args.command == "bench":
        url, sha256 = SHAKESPEARE
        path = download(url, Path(args.data_dir) / "tinyshakespeare.txt", sha256)
        text = path.read_text(encoding="utf-8")
        bench_train(text, args.vocab_size, args.naive_chars)
        bench_encode(text, args.data_dir)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
