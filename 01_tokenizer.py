"""01_tokenizer.py: from text to token ids, the byte-level BPE of GPT-2, from scratch.

A model reads integers, not text. A tokenizer turns text into a list of ids and back. Two here:
1. CharTokenizer: one id per character. Tiny vocabulary (65 for Shakespeare), long sequences,
   cannot encode a character it has not seen. The "hello world" that 05 trains on.
2. BPETokenizer: byte-level byte pair encoding (BPE), the tokenizer of GPT-2 and GPT-3 (and, with
   other merges and pre-splits, of GPT-4, Llama 3). It starts from the 256 bytes, so it can encode
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
only the pair counts that the merge changed; `--bench` times the two. Then we load OpenAI's
merges and check that our encoder gives exactly tiktoken's ids (tests/test_01_tokenizer.py does
so on all of tiny Shakespeare). Later stages copy only CharTokenizer, get_tokenizer, download,
FlagParser and the addresses of GPT-2's two files (GPT2_URL, GPT2_FILES).

References: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units";
Radford et al. 2019 (GPT-2), 2.2 byte-level BPE; openai/gpt-2 src/encoder.py; openai/tiktoken;
minbpe.

Run (CPU only; one of --train, --encode, --decode, --bench; relative paths start at this folder):
    python 01_tokenizer.py --train=data/tinyshakespeare.txt --vocab_size=1024 --out=out/bpe.json
                                        # (the text: after 02 or --bench fetched it)
    python 01_tokenizer.py --encode="Hello world, it's 2024!"          # GPT-2 (our encoder)
    python 01_tokenizer.py --encode="To be, or not to be" --tokenizer=out/bpe.json
    python 01_tokenizer.py --decode 15496 995
    python 01_tokenizer.py --bench      # the naive trainer against the incremental one (~30 s)
"""

import argparse
import difflib
import functools
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

PROJECT = Path(__file__).resolve().parent  # relative paths (data/, out/, flags) start here
DATA_DIR = PROJECT / "data"

GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"  # + "/" + filename
GPT2_FILES = {  # file name -> sha256 of its exact bytes
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# -----------------------------------------------------------------------------
# One id per character: the simplest tokenizer (later stages copy it)
#
# The vocabulary is the sorted set of characters seen, so from_text("hello") gives e=0, h=1, l=2,
# o=3: encode("hole") == [1, 3, 2, 0] and decode([2, 0]) == "le". There is no end-of-text token
# (eot_token = None): 05 trains on one continuous text. to_dict() is the small dict that meta.json
# and checkpoints store; get_tokenizer rebuilds the tokenizer from it.

class CharTokenizer:
    """One token per character: from_text("hello") gives e=0 h=1 l=2 o=3; "hole" -> [1, 3, 2, 0]."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters; use CharTokenizer.from_text(text)")
        self.chars = chars
        self.n_vocab = len(chars)
        self.eot_token = None  # no end-of-text token
        self.stoi = {ch: i for i, ch in enumerate(chars)}  # character -> id
        self.itos = dict(enumerate(chars))  # id -> character

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary: build the "
                             "tokenizer from text that has it (CharTokenizer.from_text)") from None

    def decode(self, ids) -> str:
        try:
            return "".join([self.itos[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary "
                             f"(ids are 0..{self.n_vocab - 1})") from None

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


# -----------------------------------------------------------------------------
# Bytes, the pre-split, and the two operations BPE is built from: count pairs, merge one

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> printable character, so that every token is readable text.

    Printable bytes map to themselves ("a" -> "a"); the other 68 (control bytes, space, ...)
    map to unused characters from U+0100 on, in order: space (0x20) -> "Ġ", "\\n" -> "Ċ".
    That is why GPT-2's vocab.bpe is full of "Ġthe" (= " the").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


# GPT-2's pre-split, in tiktoken's form. The original (openai/gpt-2 encoder.py) is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# tiktoken's version matches exactly the same chunks; its possessive ++ (no backtracking) and
# \s++$ make it faster. The alternatives are tried left to right at each position. Whitespace is
# split so that the last space before a word stays with the word ("a   b" -> "a", "  ", " b").
GPT2_SPLIT_PATTERN = "|".join([
    r"'(?:[sdmt]|ll|ve|re)",  # a contraction: 's 't 're 've 'm 'll 'd
    r" ?\p{L}++",  # an optional space + letters
    r" ?\p{N}++",  # an optional space + digits
    r" ?[^\s\p{L}\p{N}]++",  # an optional space + other symbols
    r"\s++$",  # whitespace that ends the text
    r"\s+(?!\S)",  # whitespace, less its last character when a non-space follows
    r"\s",  # that last character, when it is not a space that joins the word ("\n" of "a\nb")
])


def get_stats(ids: list[int], counts: dict | None = None) -> dict:
    """Count adjacent pairs, into counts if given:
    [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace each occurrence of pair by idx, left to right: ([1, 2, 3, 1, 2], (1, 2), 4) ->
    [4, 3, 4].
    subtle: occurrences may overlap ([5, 5, 5] with (5, 5)); the leftmost wins -> [idx, 5]."""
    out = []
    i = 0
    n = len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _no_pairs_left(n_done: int) -> ValueError:
    if n_done == 0:  # no vocab_size helps: the smallest, 258, needs a pair to merge
        return ValueError("the text is empty or has no pair of bytes to merge; use more text")
    return ValueError(f"the text has no pair left to merge after {n_done} merges; "
                      f"use a smaller vocab_size (at most {257 + n_done}) or more text")


# -----------------------------------------------------------------------------
# Training: the naive way (recount all pairs at each merge), then the fast one (update what changed)

def merge_logger(n_merges: int, every: int = 100):
    """A trainer's `log`: every `every` merges, print the last one, the rate and the time left."""
    t0 = time.perf_counter()

    def log(i: int, pair: tuple[int, int], idx: int, count: int):
        done = i + 1
        if done % every == 0:
            rate = done / (time.perf_counter() - t0)
            seconds_left = (n_merges - done) / rate
            print(f"  merge {done}/{n_merges}: {pair} -> {idx} ({count:,} occurrences); "
                  f"{rate:,.0f} merges/s, ~{seconds_left:.0f} s left", flush=True)
    return log


def train_bpe_naive(text: str, n_merges: int, pattern: str = GPT2_SPLIT_PATTERN, log=None) -> dict:
    """Learn n_merges merges; returns {pair: new id} in the order they were learned.

    The textbook loop: count all pairs, merge the best one everywhere, repeat. Each merge costs a
    pass over the whole corpus, so this is O(n_merges * len(text)): fine for a page, tens of
    seconds for 100 KB. Kept as the reference that train_bpe must agree with.
    log: called after each merge with (i, pair, new id, count), e.g. merge_logger(n_merges)."""
    chunks = [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, text)]
    merges = {}
    for i in range(n_merges):
        stats = {}
        for ids in chunks:
            get_stats(ids, stats)
        if not stats:
            raise _no_pairs_left(i)
        # the most frequent pair; a tie goes to the smallest pair, so both trainers agree exactly
        pair = min(stats, key=lambda p: (-stats[p], p))
        idx = 256 + i
        chunks = [merge(ids, pair, idx) for ids in chunks]
        merges[pair] = idx
        if log:
            log(i, pair, idx, stats[pair])
    return merges


def train_bpe(text: str, n_merges: int, pattern: str = GPT2_SPLIT_PATTERN, log=None) -> dict:
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
    # the distinct chunks, as ids ("words"), and how often each occurs
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    stats = defaultdict(int)  # pair -> count in the whole corpus
    where = defaultdict(set)  # pair -> indices w of the words that hold it (may be stale)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            stats[pair] += counts[w]
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in stats.items()]
    heapq.heapify(heap)  # ties: smallest pair first, as in train_bpe_naive
    merges = {}
    for i in range(n_merges):
        while heap:
            negative_count, pair = heap[0]
            if stats.get(pair) == -negative_count:
                break  # a current entry: the best pair
            heapq.heappop(heap)  # outdated entry: its pair's count changed since it was pushed
        if not heap:
            raise _no_pairs_left(i)
        negative_count, pair = heapq.heappop(heap)
        idx = 256 + i
        merges[pair] = idx
        delta = defaultdict(int)  # pair -> change of its count caused by this merge
        for w in where.pop(pair):
            ids = words[w]
            n = counts[w]
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
        if log:
            log(i, pair, idx, -negative_count)
    return merges


# -----------------------------------------------------------------------------
# The tokenizer: encode, decode, save/load, and OpenAI's GPT-2 merges

class BPETokenizer:
    """Byte-level BPE: merges (pair -> new id) + special tokens.

    A merge's new id is also its priority: merges learned earlier have smaller ids and are
    applied first (true of our trainers and of GPT-2, where merge i makes id 256 + i).
    byte_ids[b] is the id of the single byte b: b itself for our trained tokenizers, GPT-2's
    own order for OpenAI's (bytes_to_unicode's, printable first: "!" is 0, the space byte 220).
    """

    def __init__(self, merges: dict, special_tokens: dict | None = None, byte_ids=None,
                 pattern: str = GPT2_SPLIT_PATTERN):
        # sorted by new id, which is the order they apply in
        self.merges = dict(sorted(merges.items(), key=lambda item: item[1]))
        self.special_tokens = dict(special_tokens or {})  # "<|endoftext|>" -> id
        self.byte_ids = list(range(256) if byte_ids is None else byte_ids)
        self.pattern = pattern
        self.vocab = {idx: bytes([b]) for b, idx in enumerate(self.byte_ids)}  # id -> bytes
        try:
            for (a, b), idx in self.merges.items():
                self.vocab[idx] = self.vocab[a] + self.vocab[b]
        except KeyError as e:
            raise ValueError(f"merge uses token {e.args[0]} before it exists; "
                             "merges must build on bytes and on merges with smaller ids") from None
        for token, idx in self.special_tokens.items():
            self.vocab[idx] = token.encode("utf-8")
        n_ids = 256 + len(self.merges) + len(self.special_tokens)
        if sorted(self.vocab) != list(range(n_ids)):
            raise ValueError("token ids must be 0..n_vocab-1, each used once; "
                             "check merges, byte_ids and special_tokens")
        self.n_vocab = len(self.vocab)
        self.eot_token = self.special_tokens.get("<|endoftext|>")
        self.pattern_re = regex.compile(pattern)
        specials = set(self.special_tokens.values())
        # bytes -> id of every ordinary token, for the whole-chunk shortcut in _bpe
        self._token_ids = {tok: idx for idx, tok in self.vocab.items() if idx not in specials}
        # chunk -> ids, computed once. Text is Zipfian: tiny Shakespeare is 300k chunks but 15k
        # distinct ones, so almost every call is a cache hit; bounded so that memory stays bounded
        self._cache = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    @classmethod
    def train(cls, text: str, vocab_size: int, log=None) -> "BPETokenizer":
        """Learn vocab_size - 257 merges on text; the last id is "<|endoftext|>" (as in GPT-2:
        50257 = 256 bytes + 50000 merges + 1 special)."""
        if vocab_size < 257:
            raise ValueError("vocab_size must be at least 257 (256 bytes + <|endoftext|>), "
                             f"got {vocab_size}")
        merges = train_bpe(text, vocab_size - 257, log=log)
        return cls(merges, {"<|endoftext|>": vocab_size - 1})

    def apply_merges(self, ids: list[int]) -> list[int]:
        """BPE proper: repeatedly merge the adjacent pair learned first, until none is left.

        GPT-2 on " there": [Ġ t h e r e] -> [Ġt h e r e] -> [Ġt he r e] -> [Ġt he re] -> [Ġthe re]
        -> [Ġthere]. Merges apply in the order they were learned, not left to right.
        """
        ids = list(ids)
        never = self.n_vocab  # larger than any id: "not a merge"
        # ranks[i]: what the pair (ids[i], ids[i + 1]) merges into, which is also its priority
        ranks = [self.merges.get(pair, never) for pair in zip(ids, ids[1:])]
        while ranks:
            new = min(ranks)
            if new == never:
                break  # no pair left that we know how to merge
            i = ranks.index(new)  # the leftmost occurrence; the loop comes back for the others
            ids[i:i + 2] = [new]
            # only the pairs next to the new token changed: update those instead of recomputing all
            del ranks[i]
            if i < len(ranks):
                ranks[i] = self.merges.get((new, ids[i + 1]), never)
            if i > 0:
                ranks[i - 1] = self.merges.get((ids[i - 1], new), never)
        return ids

    def _bpe(self, chunk: str) -> list[int]:
        """The ids of one pre-split chunk (what the cache calls on a miss)."""
        data = chunk.encode("utf-8")
        idx = self._token_ids.get(data)
        if idx is not None:
            # the chunk is itself a token: BPE would end there too, so skip it (tiktoken does the
            # same; a test checks that this shortcut changes nothing for GPT-2)
            return [idx]
        return self.apply_merges([self.byte_ids[b] for b in data])

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as ordinary text (tiktoken's
        encode_ordinary)."""
        # lone surrogates ("\ud800", e.g. from a broken JSON escape) have no UTF-8 encoding; like
        # tiktoken, we re-read the text as UTF-16: they become U+FFFD, a split pair its character
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        chunks = self.pattern_re.findall(text)  # "Hello world!" -> ["Hello", " world", "!"]
        # one cache lookup per chunk, flattened; map/chain keep the loop in C, which matters here
        return list(chain.from_iterable(map(self._cache, chunks)))

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        """Encode text; special tokens are recognised only when allowed, as in tiktoken.

        allowed_special: "none_raise" (default: text containing a special token raises, because
        a user typing "<|endoftext|>" must not be able to end your document), "all", or a set.
        To encode special-token strings as plain text, use encode_ordinary."""
        specials = set(self.special_tokens)
        if isinstance(allowed_special, (set, frozenset)):
            allowed = set(allowed_special)
        elif allowed_special == "all":
            allowed = specials
        elif allowed_special == "none_raise":
            allowed = set()
        else:
            raise ValueError("allowed_special must be 'none_raise', 'all' or a set, "
                             f"got {allowed_special!r}")
        unknown = allowed - specials
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; "
                             f"this one has {sorted(specials)}")
        found = [token for token in specials - allowed if token in text]
        if found:
            token = min(found, key=text.index)  # the first one in the text, as tiktoken reports
            raise ValueError("Encountered text corresponding to disallowed special token "
                             f"{token!r}.\n"
                             "If you want this text to be encoded as a special token, "
                             "pass it to `allowed_special`, "
                             f"e.g. `allowed_special={{{token!r}}}` (or 'all').\n"
                             "If you want it encoded as normal text, use `encode_ordinary`.")
        if not allowed:
            return self.encode_ordinary(text)
        longest_first = sorted(allowed, key=len, reverse=True)
        separators = "|".join(map(regex.escape, longest_first))
        # split keeps the separators because of the capture group: "a<|endoftext|>b" ->
        # ["a", "<|endoftext|>", "b"]; the special tokens are at the odd positions
        parts = regex.split(f"({separators})", text)
        ids = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                ids.extend(self.encode_ordinary(part))
            else:
                ids.append(self.special_tokens[part])
        return ids

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

    # -- save / load, as JSON a person can read ---------------------------------

    def save(self, path) -> Path:
        """Write the tokenizer as JSON a person can read: tokens use GPT-2's printable byte
        characters ("Ġthe" = " the"); merges are [a, b, new id]."""
        show = bytes_to_unicode()
        specials = set(self.special_tokens.values())
        ordinary = [(idx, tok) for idx, tok in sorted(self.vocab.items()) if idx not in specials]
        vocab = {idx: "".join(map(show.get, token)) for idx, token in ordinary}
        merges = [[a, b, idx] for (a, b), idx in self.merges.items()]
        data = {"kind": "bpe", "pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab": vocab, "merges": merges}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, ensure_ascii=False, indent=1)
        # indent=1 puts each number of a merge on a line of its own: one merge per line instead
        text = regex.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)
        tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never half a file
        try:
            tmp.write_text(text, encoding="utf-8")
            return tmp.replace(path)  # path, now the whole file
        finally:  # a failed write or rename (path is a folder, the disk is full) leaves no .tmp
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        show = bytes_to_unicode()
        try:  # missing, unreadable, not UTF-8, not JSON, or JSON that save() did not write
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data["kind"] != "bpe":  # another tokenizer's dict, e.g. CharTokenizer.to_dict()
                raise ValueError
            ids = {tok: int(idx) for idx, tok in data["vocab"].items()}  # token -> id
            byte_ids = [ids[show[b]] for b in range(256)]  # each byte is a one-character token
            merges = {(a, b): idx for a, b, idx in data["merges"]}
            return cls(merges, data["special_tokens"], byte_ids, data["pattern"])
        except (OSError, ValueError, LookupError, TypeError, AttributeError, regex.error):
            raise ValueError(f"{path} is missing or not a BPETokenizer file (\"kind\": \"bpe\"); "
                             "write one with BPETokenizer.save or "
                             "`python 01_tokenizer.py --train`") from None

    @classmethod
    def from_gpt2(cls, encoder_json, vocab_bpe) -> "BPETokenizer":
        """OpenAI's GPT-2 tokenizer from its two files.

        encoder.json: token (printable form) -> id, 50,257 entries, "<|endoftext|>" = 50256.
        vocab.bpe: a "#version" line, then the 50,000 merges in order, one "a b" per line,
        e.g. "Ġ t" (merge 0: " " + "t" -> " t"), "Ġ a", "h e", ...
        """
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]  # after "#version"
        special_tokens = {"<|endoftext|>": encoder.pop("<|endoftext|>")}
        show = bytes_to_unicode()
        try:
            byte_ids = [encoder[show[b]] for b in range(256)]
            pairs = [line.split(" ") for line in lines if line]
            merges = {(encoder[a], encoder[b]): encoder[a + b] for a, b in pairs}
        except (KeyError, ValueError) as e:
            raise ValueError(f"{encoder_json} and {vocab_bpe} do not match ({e!r}); "
                             "download both again (see GPT2_FILES)") from e
        return cls(merges, special_tokens, byte_ids)


# -----------------------------------------------------------------------------
# OpenAI's files, fetched safely, and the factory later stages use (they copy both)
#
# download() is careful because a bad file fails far from its cause. The body is streamed to
# path + ".tmp" and renamed to path (os.replace, atomic) only once it is complete and checked, so
# a file at path is always a finished download: an interrupted one is never mistaken for the real
# thing, and a file already there is not fetched again. sha256 pins the exact bytes we expect (a
# server can change a file under the same URL); None means no published hash (Hugging Face's
# weights), and then the byte count the server announced is checked. The hashed files here are
# small, so a file already there is hashed in one read. "Accept-Encoding: identity" asks for the
# raw bytes: a gzip-encoded response would make the count differ from Content-Length. On an HTTP
# error, a short body or a wrong hash we raise (RuntimeError/ValueError naming the fix) and leave
# no file behind; a file already there with another hash is not ours: kept, refused. Big files
# (> 16 MB) print their progress: MB done, rate, time left.

def download(url: str, path, sha256: str | None = None, timeout: float = 30) -> Path:
    """Download url to path, unless a good file is there: streamed to path + ".tmp", checked,
    renamed. sha256=None: no pinned hash (Hugging Face's weights); the byte count is checked."""
    path = Path(path)
    if path.exists():  # ours get this name only once checked; a bad one is the user's: never lost
        if sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
        raise ValueError(f"{path} is not the file expected (its sha256 differs): move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    digest = hashlib.sha256()
    done = 0  # bytes written so far
    t0 = time.perf_counter()
    headers = {"Accept-Encoding": "identity"}  # the raw bytes, no gzip
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0))  # exact: identity encoding
            with open(tmp, "wb") as f:
                for block in response.iter_content(chunk_size=1 << 20):
                    done += f.write(block)
                    digest.update(block)
                    if total > 1 << 24:  # progress for big files (> 16 MB)
                        rate = done / (time.perf_counter() - t0)  # bytes/s
                        megabytes = f"{done >> 20:,}/{total >> 20:,} MB"
                        seconds_left = (total - done) / rate
                        end = "\n" if done == total else ""  # the last report ends the line
                        print(f"\r{path.name}: {megabytes}, {rate / 2**20:.1f} MB/s, "
                              f"~{seconds_left:.0f} s left ", end=end, flush=True)
        if total and done != total:
            raise RuntimeError(f"download of {url} stopped after {done} of {total} bytes; retry")
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; retry; "
                             "if it persists the file changed upstream: check it and update the "
                             f"hash, or put the expected file in {path.parent} by hand")
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise RuntimeError(f"download of {url} failed: {e}; check the URL and your network, "
                           f"or put the file at {path} by hand") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def gpt2(data_dir=DATA_DIR) -> BPETokenizer:
    """Our GPT-2 tokenizer, downloading encoder.json and vocab.bpe into data_dir if needed."""
    paths = {}
    for name, sha256 in GPT2_FILES.items():
        paths[name] = download(f"{GPT2_URL}/{name}", Path(data_dir) / name, sha256)
    return BPETokenizer.from_gpt2(paths["encoder.json"], paths["vocab.bpe"])


# get_tokenizer: checkpoints and meta.json store a small dict, not the tokenizer, and this rebuilds
# it. For GPT-2 it returns tiktoken's encoding (Rust, fast); BPETokenizer.from_gpt2 gives the same
# ids (the tests check it) and shows how they are made.
def get_tokenizer(spec: dict):
    """{"kind": "char", "chars": ...} -> CharTokenizer; {"kind": "gpt2"} -> tiktoken's GPT-2."""
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        import tiktoken  # only when asked for: char-only scripts do not need it
        return tiktoken.get_encoding("gpt2")
    raise ValueError(f"unknown tokenizer kind {kind!r}; use kind 'char' (with 'chars') or 'gpt2'")


# -----------------------------------------------------------------------------
# The lesson in numbers (python 01_tokenizer.py --bench), and the command line (02, 03 copy it)

def bench_train(text: str, vocab_size: int, naive_chars: int) -> None:
    """The naive trainer against ours on the first naive_chars of text, then ours on all of it."""
    n_merges = vocab_size - 257
    head = text[:naive_chars]
    print(f"naive trainer (recount), {n_merges} merges on the first {len(head):,} characters:",
          flush=True)
    runs = [  # (name, trainer, text, log)
        ("naive (recount)", train_bpe_naive, head, merge_logger(n_merges)),
        ("ours (incremental)", train_bpe, head, None),
        ("ours (incremental)", train_bpe, text, None),
    ]
    rows = []  # (name, text, merges, seconds)
    for name, train, sample, log in runs:
        t0 = time.perf_counter()
        merges = train(sample, n_merges, log=log)
        rows.append((name, sample, merges, time.perf_counter() - t0))
    _, _, naive_merges, naive_seconds = rows[0]
    _, _, our_merges, _ = rows[1]
    print(f"\nBPE training to vocab {vocab_size} ({n_merges} merges + <|endoftext|>)")
    print(f"{'trainer':<20} {'text bytes':>11} {'seconds':>8} {'ms/merge':>9} {'speedup':>8}")
    for name, sample, _, seconds in rows:
        speedup = f"{naive_seconds / seconds:.1f}x" if sample is head else "-"
        n_bytes = len(sample.encode("utf-8"))
        ms_per_merge = 1000 * seconds / n_merges
        print(f"{name:<20} {n_bytes:>11,} {seconds:>8.2f} {ms_per_merge:>9.2f} {speedup:>8}")
    print(f"same merges as the naive trainer: {our_merges == naive_merges}")


class FlagParser(argparse.ArgumentParser):
    """argparse with no abbreviations (--vocab is not --vocab_size) and the help 04-13 print. A
    mistake is one line and exit status 2, not a usage dump; a misspelt flag gets the closest one:
    `error: unrecognized arguments: --vocab_siz=9 (did you mean --vocab_size?)`."""

    class Help(argparse.MetavarTypeHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Each flag as `--name TYPE  meaning (default: X)`."""

    def __init__(self, **options):
        super().__init__(allow_abbrev=False, formatter_class=self.Help, **options)

    def error(self, message: str):
        hint = "see --help"
        if message.startswith("unrecognized arguments: "):
            first = message.split()[2].split("=")[0]  # "--vocab_siz=9" -> "--vocab_siz"
            flags = [flag for action in self._actions for flag in action.option_strings]
            close = difflib.get_close_matches(first, flags, n=1)
            if close:
                hint = f"did you mean {close[0]}?"
        self.exit(2, f"error: {message} ({hint})\n")


def main(argv=None):
    parser = FlagParser(description=__doc__.split("\n")[0])  # the docstring's first line
    todo = parser.add_mutually_exclusive_group()  # what to do: one of these four
    todo.add_argument("--train", type=str, help="learn BPE merges from this UTF-8 text file")
    todo.add_argument("--encode", type=str, help="print this text's token ids, and each token")
    todo.add_argument("--decode", type=int, nargs="+", help="print the text of ids: 15496 995")
    todo.add_argument("--bench", action="store_true", help="time the naive trainer against ours")
    parser.add_argument("--vocab_size", type=int, default=1024,
                        help="tokens in all (--train, --bench): 256 bytes, merges, <|endoftext|>")
    parser.add_argument("--out", type=str, default="out/bpe.json", help="the file --train writes")
    parser.add_argument("--tokenizer", type=str, default="gpt2",
                        help="--encode, --decode: gpt2 (OpenAI's merges) or a file --train wrote")
    parser.add_argument("--allowed_special", type=str, default="none_raise",
                        choices=["none_raise", "all"], help="all: <|endoftext|> is that token")
    parser.add_argument("--naive_chars", type=int, default=100_000,
                        help="--bench: characters of text for the naive (slow) trainer")
    try:  # the user's input or network: one line `error: ...`, exit status 2, no traceback
        run(parser.parse_args(argv))
    except (ValueError, OSError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:  # --train and --bench take a while: a stop is one line, no traceback
        parser.exit(130, "\nCtrl-C: stopped\n")


def run(args):  # main's work, its arguments checked before any of it
    if args.train is None and args.encode is None and args.decode is None and not args.bench:
        raise ValueError("say what to do: --train=FILE, --encode=TEXT, --decode IDS or --bench")
    if args.vocab_size < 258:  # 256 bytes, <|endoftext|>, and a merge to learn
        raise ValueError(f"--vocab_size={args.vocab_size}; use at least 258 (256 bytes + 2)")
    if args.encode and "<|endoftext|>" in args.encode and args.allowed_special == "none_raise":
        raise ValueError("--encode's text holds <|endoftext|>; --allowed_special=all: one token")
    out = PROJECT / args.out  # --train's file: a new one, or a tokenizer 01 wrote (replaced)
    if args.train is not None and (args.out.endswith(("/", os.sep)) or out.is_dir()):
        raise ValueError(f"--out={args.out} is a folder: name a file, e.g. --out={out}/bpe.json")
    above = next(p for p in out.parents if p.exists())  # save() makes out's folders inside it
    if args.train is not None and not above.is_dir():
        raise ValueError(f"--out={args.out} is inside the file {above}: name a file in a folder")
    try:  # any other file there is the user's (their text, their JSON): never written over
        if args.train is not None and out.exists():
            BPETokenizer.load(out)  # it loads: a tokenizer 01 wrote, which a new run may replace
    except ValueError:
        raise ValueError(f"--out={args.out} is not a file 01 wrote: name another file") from None
    if args.train is not None:
        path = PROJECT / args.train
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError):  # missing, unreadable or not UTF-8
            raise ValueError(f"--train={args.train}: no UTF-8 text file at {path}") from None
        t0 = time.perf_counter()
        tok = BPETokenizer.train(text, args.vocab_size, log=merge_logger(args.vocab_size - 257))
        seconds = time.perf_counter() - t0
        print(f"{len(tok.merges)} merges in {seconds:.2f} s; wrote {tok.save(out)}")
        sample = text[:100_000]
        ratio = len(sample.encode("utf-8")) / len(tok.encode_ordinary(sample))
        print(f"compression on the first 100k characters: {ratio:.2f} bytes/token")
    elif args.bench:
        if args.naive_chars <= 0:
            raise ValueError(f"--naive_chars={args.naive_chars}; use a positive count, e.g. 100000")
        path = download(SHAKESPEARE_URL, DATA_DIR / "tinyshakespeare.txt", SHAKESPEARE_SHA256)
        bench_train(path.read_text(encoding="utf-8"), args.vocab_size, args.naive_chars)
    else:  # --encode or --decode
        tok = gpt2() if args.tokenizer == "gpt2" else BPETokenizer.load(PROJECT / args.tokenizer)
        if args.decode is not None:
            print(tok.decode(args.decode))
            return
        ids = tok.encode(args.encode, allowed_special=args.allowed_special)
        print(ids)
        print(" | ".join(repr(tok.decode([i])) for i in ids))


if __name__ == "__main__":
    main()
