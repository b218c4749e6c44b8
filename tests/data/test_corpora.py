import json
import sys
import types

import pytest

from saelab.data.corpora import iter_documents
from saelab.errors import DataError


def test_kjv_is_one_document_per_chapter():
    chapters = list(iter_documents("kjv"))
    assert len(chapters) == 1189  # chapters in the KJV
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.")
    assert chapters[0].endswith("And the evening and the morning were the sixth day.")  # Genesis 1:31, not 2:1
    assert all(chapter.strip() for chapter in chapters)


def test_pydoc_topics_and_max_documents():
    from pydoc_data.topics import topics

    documents = list(iter_documents("pydoc"))
    assert len(documents) == sum(1 for text in topics.values() if text.strip())
    assert list(iter_documents("pydoc", max_documents=3)) == documents[:3]


def test_sources_joined_with_plus_are_read_in_order():
    joined = list(iter_documents("pydoc+kjv", max_documents=200))
    pydoc = list(iter_documents("pydoc"))
    assert joined[: len(pydoc)] == pydoc
    assert joined[len(pydoc)].startswith("In the beginning")


def test_txt_file_is_split_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first para\nstill first\n\n\n  second  \n \nthird\n\n")
    assert list(iter_documents(str(path))) == ["first para\nstill first", "second", "third"]


def test_folder_of_txt_files_is_one_document_per_file_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n\nstill bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "ignored.md").write_text("no")
    assert list(iter_documents(str(tmp_path))) == ["ay", "bee\n\nstill bee", "sea"]


def test_jsonl_reads_the_text_field_and_names_a_bad_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": " two "}) + "\n")
    assert list(iter_documents(str(path), text_field="body")) == ["one", "two"]
    with pytest.raises(DataError, match=r"docs.jsonl:1 has no string field 'text' \(it has \['body'\]\)"):
        list(iter_documents(str(path)))
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2 is not valid JSON"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("wikipedia", "unknown corpus source 'wikipedia'"),
        ("missing/file.txt", "does not exist"),
        ("kjv+nope", "unknown corpus source 'nope'"),
        ("hf:only-name", "hf:<dataset>"),
    ],
)
def test_bad_sources_list_the_valid_forms(source, message):
    with pytest.raises(DataError, match=message) as info:
        list(iter_documents(source))
    assert "hf:<dataset>[:<config>]:<split>" in str(info.value)


def test_hf_source_without_the_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        list(iter_documents("hf:someone/corpus:train"))


def test_hf_source_streams_the_text_column(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "alpha", "id": 1}, {"text": "", "id": 2}, {"text": "beta", "id": 3}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(iter_documents("hf:org/set:wiki:validation")) == ["alpha", "beta"]
    assert list(iter_documents("hf:org/set:train", max_documents=1)) == ["alpha"]
    assert calls == [("org/set", "wiki", "validation", True), ("org/set", None, "train", True)]
    with pytest.raises(DataError, match=r"no string field 'body' \(it has \['id', 'text'\]\)"):
        list(iter_documents("hf:org/set:train", text_field="body"))
