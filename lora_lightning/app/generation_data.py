"""Generation data for the causal-LM job: the E2E NLG restaurant descriptions (GEM's cleaned E2E as
shipped in the ``bigbench`` package) or a JSONL file (optionally gzipped) of
``{"input": ..., "target": str | [str, ...]}``.

Examples are grouped by input (one meaning representation, several human references). The split is
by input, so no input is seen in training and scored in test; training uses every (input, reference)
pair, generation is scored per input against all its references. Prompts go through the tokenizer's
chat template (user turn = ``instruction + input``, then the assistant prefix); the loss covers the
answer tokens and the end-of-turn token only. Training batches are length-bucketed: shuffled chunks
of ``bucket`` batches are sorted by length, so little compute goes to padding.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lora_lightning.errors import DataError

E2E_SOURCE = "e2e_nlg"
E2E_INSTALL_HINT = "pip install --no-deps bigbench==1.0.0"
E2E_INSTRUCTION = "Describe the restaurant in one sentence. Attributes: "


@dataclass(frozen=True)
class Group:
    """One input and its human references."""

    input: str
    references: tuple[str, ...]


def e2e_path() -> Path:
    """``bigbench/benchmark_tasks/gem/e2e_nlg/task.json`` in the installed ``bigbench`` (found without
    importing it: its declared dependencies, TensorFlow among them, are not needed)."""
    spec = importlib.util.find_spec("bigbench")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data=e2e_nlg needs the bigbench 1.0.0 package (it ships GEM's E2E NLG): run `{E2E_INSTALL_HINT}` where "
            'your package index serves it, or set data.source to a .jsonl file of {"input": ..., "target": ...} '
            "records"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "benchmark_tasks" / "gem" / "e2e_nlg" / "task.json"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `{E2E_INSTALL_HINT}`")
    return path


def read_groups(path: str | Path) -> list[Group]:
    """Groups from a JSONL file (``.jsonl`` or ``.jsonl.gz``) or a BIG-bench ``task.json`` (``examples``), in
    first-seen order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; set data.source to {E2E_SOURCE!r} or a .jsonl path")
    zipped = path.suffix == ".gz"
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8") if zipped else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as {'gzipped ' if zipped else ''}UTF-8 text ({e})") from None
    is_json = (path.with_suffix("") if zipped else path).suffix == ".json"
    try:
        lines = [] if is_json else [line for line in text.splitlines() if line.strip()]
        records = json.loads(text)["examples"] if is_json else [json.loads(line) for line in lines]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a JSONL file of {{'input': ..., 'target': ...}} records ({e})") from None
    refs: dict[str, list[str]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "input" not in rec or "target" not in rec:
            raise DataError(f"{path}: record {i} has no 'input' and 'target' fields: {str(rec)[:80]}")
        targets = rec["target"] if isinstance(rec["target"], list) else [rec["target"]]
        bucket = refs.setdefault(str(rec["input"]).strip(), [])
        bucket += [str(t).strip() for t in targets if str(t).strip() and str(t).strip() not in bucket]
    return [Group(k, tuple(v)) for k, v in refs.items() if v]


def split_groups(
    groups: Sequence[Group], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Group]]:
    """Seeded split by input."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1."
        )
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    pick = lambda idx: [groups[i] for i in idx]  # noqa: E731
    return {
        "test": pick(order[:n_test]),
        "val": pick(order[n_test : n_test + n_val]),
        "train": pick(order[n_test + n_val :]),
    }


class PromptTargetDataset(Dataset):
    """Token ids of ``prompt + answer + end-of-turn`` and the prompt length (its labels are ignored)."""

    def __init__(self, items: list[tuple[list[int], int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.items[i]


class CausalCollator:
    """Right-pads a batch; ``labels`` = the ids with -100 on the prompt and the padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            t = torch.tensor(ids)
            input_ids[row, : len(ids)] = t
            mask[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = t[n_prompt:]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length: each epoch shuffles the indices (seeded by ``seed + epoch``), sorts
    chunks of ``bucket`` batches by length, cuts them into batches and shuffles the batch order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucket: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.bucket, self.epoch = list(lengths), batch_size, seed, bucket, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at every epoch start
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        chunk = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.lengths[i])
            batches += [part[k : k + self.batch_size] for k in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class GenerationDataModule(LightningDataModule):
    """Prompt -> answer data for :class:`~lora_lightning.app.causal_lm.CausalLMModule`.

    ``source``: ``"e2e_nlg"`` or a JSONL path. ``tokenizer``: ``"smollm2"`` or a local folder. Sizes cap
    the number of *inputs* per split (``None``: all); ``seed`` fixes the split, ``shuffle_seed`` the batch
    order. ``max_target_tokens`` truncates long answers (the end-of-turn token is kept). ``max_length``
    (what ``scale=smoke`` sets for every job): a cap on the same answers' length for short smoke runs; the
    prompt is never cut (the model must see the whole input).
    """

    def __init__(
        self,
        source: str = E2E_SOURCE,
        tokenizer: str = "smollm2",
        instruction: str = E2E_INSTRUCTION,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        max_target_tokens: int = 64,
        seed: int = 0,
        shuffle_seed: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        bucket: int = 50,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
                raise DataError(
                    f"max_length={max_length!r} must be an integer >= 2 (room for a token and the end of turn)"
                )
            max_target_tokens = min(max_target_tokens, max_length)
        self.source, self.tokenizer_name, self.instruction = source, tokenizer, instruction
        self.batch_size, self.eval_batch_size, self.max_target_tokens = batch_size, eval_batch_size, max_target_tokens
        self.seed = seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.val_fraction, self.test_fraction, self.bucket = val_fraction, test_fraction, bucket
        self.caps = {"train": train_size, "val": val_size, "test": test_size}
        self._tokenizer: Any = None
        self.groups: dict[str, list[Group]] = {}
        self.datasets: dict[str, PromptTargetDataset] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from .causal_lm import resolve_decoder_path
            from .data import load_tokenizer

            self._tokenizer = load_tokenizer(resolve_decoder_path(self.tokenizer_name))
            if self._tokenizer.chat_template is None:
                raise DataError(
                    f"tokenizer {self.tokenizer_name!r} has no chat template; the causal-LM job needs an instruct "
                    "model's tokenizer"
                )
            if self._tokenizer.pad_token_id is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def prompt_ids(self, text: str) -> list[int]:
        """The chat-templated prompt for one input, ending with the assistant prefix."""
        messages = [{"role": "user", "content": self.instruction + text}]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def answer_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_target_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def setup(self, stage: str | None = None) -> None:
        if self.groups:
            return
        path = e2e_path() if self.source == E2E_SOURCE else Path(self.source)
        groups = split_groups(read_groups(path), self.val_fraction, self.test_fraction, self.seed)
        for split, members in groups.items():
            cap = self.caps[split]
            self.groups[split] = members[:cap] if cap is not None else members
            items = []
            for g in self.groups[split]:
                prompt = self.prompt_ids(g.input)
                items += [(prompt + self.answer_ids(ref), len(prompt)) for ref in g.references]
            self.datasets[split] = PromptTargetDataset(items)
        if not self.datasets["train"].items:
            raise DataError("the train split is empty; check data.train_size and the split fractions")

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        data = self.datasets[split]
        if not len(data):
            raise DataError(f"the {split} split is empty; check data.{split}_size and the split fractions")
        collate = CausalCollator(self.tokenizer.pad_token_id)
        if split == "train":
            sampler = BucketBatchSampler(
                [len(ids) for ids, _ in data.items], self.batch_size, self.shuffle_seed, self.bucket
            )
            return DataLoader(data, batch_sampler=sampler, collate_fn=collate)
        return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def prompts(self, split: str = "test") -> tuple[list[list[int]], list[tuple[str, ...]]]:
        """Prompt ids and reference lists of the split's inputs (for generation)."""
        self.setup()
        return [self.prompt_ids(g.input) for g in self.groups[split]], [g.references for g in self.groups[split]]
