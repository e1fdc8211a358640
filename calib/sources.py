"""Where benchmark text comes from: a local folder, or the Hugging Face hub.

A local folder is laid out like this (the names of the public releases):

    wikitext-2-raw/wiki.{train,valid,test}.raw
    c4/c4-train.00000-of-01024*.jsonl          one {"text": ...} per line
    c4/c4-validation.00000-of-00008*.jsonl
    ptb/ptb.{train,valid,test}.txt

It is found from an explicit `data_dir` (a recipe field), else from the
environment variable COMPRESS_DATA_DIR. Without either, the text comes from the
hub through `datasets.load_dataset`; when that fails (no network) the user gets a
one-line CompressError saying how to point at a local folder.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Union

from compress.errors import CompressError

log = logging.getLogger(__name__)

ENV_VAR = "COMPRESS_DATA_DIR"
DATASETS = ("wikitext2", "c4", "ptb")
# Accepted split names per dataset, mapped to the canonical name used below.
SPLITS = {
    "wikitext2": {"train": "train", "valid": "valid", "validation": "valid", "test": "test"},
    "c4": {"train": "train", "valid": "validation", "validation": "validation"},
    "ptb": {"train": "train", "valid": "valid", "validation": "valid", "test": "test"},
}
# The standard C4 perplexity text is the first 1100 validation documents (GPTQ).
C4_EVAL_DOCS = 1100
_C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_HUB_SPLIT = {"train": "train", "valid": "validation", "validation": "validation",
              "test": "test"}


def resolve_data_dir(data_dir: Union[str, os.PathLike, None],
                     field: str = "data_dir") -> Optional[Path]:
    """Return the local data folder: `data_dir` if given, else $COMPRESS_DATA_DIR, else None.

    `field` names the recipe field in error messages (e.g. "calib.data_dir").
    """
    if data_dir is not None and str(data_dir) != "":
        where, path = field, Path(data_dir).expanduser()
    elif os.environ.get(ENV_VAR):
        where, path = ENV_VAR, Path(os.environ[ENV_VAR]).expanduser()
    else:
        return None
    if not path.is_dir():
        raise CompressError(f"{where}: data folder not found: {path}")
    return path


def canonical_split(dataset: str, split: str, field: str = "split") -> str:
    """Map a user split name ('valid', 'validation', ...) to the canonical one."""
    if dataset not in SPLITS:
        raise CompressError(f"dataset: expected one of {', '.join(DATASETS)}, got {dataset!r}")
    allowed = SPLITS[dataset]
    if split not in allowed:
        raise CompressError(
            f"{field}: {dataset} has splits {', '.join(sorted(allowed))}, got {split!r}")
    return allowed[split]


def load_rows(dataset: str, split: str, data_dir: Union[str, os.PathLike, None] = None,
              *, prefix: str = "") -> List[str]:
    """Rows of a split exactly as HF `datasets` gives them.

    wikitext2: the file's lines; whitespace-only lines become "" and the others keep
               their trailing newline (this is how the HF builder reads the raw files).
    c4:        the documents' "text" in shard order.
    ptb:       the sentences, stripped (HF `ptb_text_only` 'sentence').
    `prefix` is prepended to field names in errors ("calib." -> "calib.split").
    """
    split = canonical_split(dataset, split, f"{prefix}split")
    folder = resolve_data_dir(data_dir, f"{prefix}data_dir")
    if folder is not None:
        return _local_rows(dataset, split, folder, prefix)
    return _hub_rows(dataset, split, prefix)


def load_text(dataset: str, split: str, data_dir: Union[str, os.PathLike, None] = None,
              *, prefix: str = "") -> str:
    """Raw text of an eval / calibration split, joined as the standard protocol does.

    wikitext2 -> "\\n\\n".join(rows)            (lm-eval, GPTQ, SparseGPT, Wanda, HF guide)
    c4        -> " ".join(docs); validation keeps the first 1100 docs (GPTQ C4 ppl)
    ptb       -> " ".join(sentences)           (GPTQ)
    """
    rows = load_rows(dataset, split, data_dir, prefix=prefix)
    if dataset == "wikitext2":
        return "\n\n".join(rows)
    if dataset == "c4" and canonical_split("c4", split) == "validation":
        rows = rows[:C4_EVAL_DOCS]
    return " ".join(rows)


# -- local folder ------------------------------------------------------------------
def _local_rows(dataset: str, split: str, folder: Path, prefix: str) -> List[str]:
    if dataset == "wikitext2":
        path = folder / "wikitext-2-raw" / f"wiki.{split}.raw"
        if not path.is_file():
            hint = " use split: valid, or source: c4" if split == "train" else ""
            raise CompressError(
                f"{prefix}split: wikitext2 '{split}' is not in the data folder {folder} "
                f"(missing {path.relative_to(folder)});{hint or ' give a complete folder'}")
        # Keep line ends: HF rows keep their '\n'; whitespace-only lines become "".
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        return [line if line.strip() else "" for line in lines]
    if dataset == "ptb":
        path = folder / "ptb" / f"ptb.{split}.txt"
        if not path.is_file():
            raise CompressError(f"{prefix}split: ptb '{split}' is not in the data folder {folder} "
                                f"(missing {path.relative_to(folder)})")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    # c4: the shard may be stored whole or as its first documents (".first1041").
    stem = _C4_HUB_FILES[split].split("/")[-1].replace(".json.gz", "")
    files = sorted((folder / "c4").glob(f"{stem}*.jsonl"))
    if not files:
        raise CompressError(f"{prefix}split: c4 '{split}' is not in the data folder {folder} "
                            f"(no c4/{stem}*.jsonl)")
    return read_jsonl(files[0], "text", field=f"{prefix}data_dir")


def read_jsonl(path: Path, key: str, field: str = "calib.field") -> List[str]:
    """The string `key` of every JSON line of `path` (blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            value = obj.get(key) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise CompressError(
                    f"{field}: line {lineno} of {path} has no string field {key!r}")
            rows.append(value)
    return rows


# -- hub ---------------------------------------------------------------------------
def _hub_rows(dataset: str, split: str, prefix: str) -> List[str]:
    """Rows from the hub; any failure (usually: offline) becomes a one-line error."""
    import datasets  # heavy import, only when the hub is really used

    hub_split = _HUB_SPLIT[split]
    log.info("loading %s/%s from the Hugging Face hub", dataset, hub_split)
    try:
        if dataset == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
            return list(ds["text"])
        if dataset == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=hub_split)
            return list(ds["sentence"])
        ds = datasets.load_dataset("allenai/c4", data_files={hub_split: _C4_HUB_FILES[split]},
                                   split=hub_split)
        return list(ds["text"])
    except Exception as e:  # network, auth, missing script: all mean "use a local copy"
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CompressError(
            f"{prefix}data_dir: could not load {dataset} '{split}' from the Hugging Face hub "
            f"({reason}); "
            f"set data_dir in the recipe or {ENV_VAR} to a local folder "
            f"(wikitext-2-raw/, c4/, ptb/)") from None
