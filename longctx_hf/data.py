"""Training text for fine-tuning: read documents, tokenize, pack them into fixed-length blocks.

Packing follows transformers' padding-free convention: documents are joined with an EOS token and each block
carries `position_ids` that restart at 0 where a document starts. With no `attention_mask`, transformers 5 reads
those restarts as document boundaries on every attention path: flash_attention_2 runs its varlen kernel, sdpa and
eager get a block-diagonal causal mask (which costs an explicit n x n mask and SDPA's fused causal kernel). With
`separate_documents=False` blocks are plain concatenation (positions 0..n-1, documents attend to each other), which
keeps SDPA's fast causal path.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
IGNORE_INDEX = -100  # transformers' causal-LM loss skips these labels


def check_data_source(data) -> str:
    """'file', 'folder' or 'hub' for `data`; a clear error if it is none of them (nothing is read)."""
    if not isinstance(data, (str, Path)) or not str(data):
        raise TypeError(f"data must be a text file, a folder of text files or a Hub dataset name; got {data!r}")
    path = Path(data)
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    if not _HUB_NAME.match(str(data)) or path.suffix in TEXT_SUFFIXES:
        raise ValueError(f"data: no such file or folder: {str(data)!r} (nor is it a Hub dataset name like 'owner/name')")
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"data {str(data)!r} is not a local file or folder, and reading a Hub dataset needs the "
                         "optional package `datasets` (pip install datasets)")
    return "hub"


def read_documents(data, text_column: str = "text") -> list[str]:
    """The documents of a text file (one document), a folder (one per text file, sorted) or a Hub dataset."""
    kind = check_data_source(data)
    if kind == "file":
        return [Path(data).read_text(encoding="utf-8")]
    if kind == "folder":
        files = sorted(p for p in Path(data).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(data).parts))
        if not files:
            raise ValueError(f"data folder {str(data)!r} has no text files ({', '.join(TEXT_SUFFIXES)})")
        return [p.read_text(encoding="utf-8") for p in files]
    import datasets

    dataset = datasets.load_dataset(str(data), split="train")
    if text_column not in dataset.column_names:
        raise ValueError(f"Hub dataset {str(data)!r} has no column {text_column!r}; it has {dataset.column_names}")
    return [text for text in dataset[text_column] if text]


def pack(documents: list[list[int]], eos_token_id: int, max_length: int, separate_documents: bool = True) -> dict:
    """Join token lists with EOS and cut them into `max_length` blocks (the incomplete tail is dropped).

    Returns int64 tensors `input_ids`, `position_ids`, `labels` of shape (blocks, max_length). With
    `separate_documents`, positions restart at every document start (and at every block start), and the first
    token of a document is not a target, because its only context would be the previous document.
    """
    stream, starts = [], []
    for tokens in documents:
        starts.append(len(stream))
        stream.extend(tokens)
        stream.append(eos_token_id)
    blocks = len(stream) // max_length
    if blocks == 0:
        raise ValueError(f"the data has {len(stream)} tokens, fewer than max_length={max_length}: "
                         "give more text or a smaller max_length")
    input_ids = torch.tensor(stream[: blocks * max_length], dtype=torch.long).view(blocks, max_length)
    labels = input_ids.clone()
    if not separate_documents:
        positions = torch.arange(max_length).expand(blocks, max_length).clone()
        return {"input_ids": input_ids, "position_ids": positions, "labels": labels}
    is_start = torch.zeros(blocks * max_length, dtype=torch.bool)
    is_start[[s for s in starts if s < blocks * max_length]] = True
    is_start = is_start.view(blocks, max_length)
    labels[is_start] = IGNORE_INDEX
    is_start[:, 0] = True
    index = torch.arange(max_length).expand(blocks, max_length)
    last_start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return {"input_ids": input_ids, "position_ids": index - last_start, "labels": labels}


class PackedBlocks(torch.utils.data.Dataset):
    """The packed blocks as a map-style dataset of dicts (what a DataLoader and HF Trainer both take)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self):
        return self.tensors["input_ids"].shape[0]

    def __getitem__(self, index):
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def packed_dataset(data, tokenizer, max_length: int, separate_documents: bool = True,
                   text_column: str = "text") -> PackedBlocks:
    """Read, tokenize (no special tokens; EOS between documents) and pack `data`."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; packing needs it to separate documents")
    texts = read_documents(data, text_column)
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return PackedBlocks(pack(tokens, tokenizer.eos_token_id, max_length, separate_documents))
