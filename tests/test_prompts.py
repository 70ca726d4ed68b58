"""Built-in prompt sets (size, balance, splits, hygiene) and the prompt loaders (every format, every error)."""

from __future__ import annotations

import itertools
import json
import re
import sys
import types
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from abliterate.errors import AbliterateError
from abliterate.prompts import BUILTIN_NAMES, builtin, builtin_records, general_text, load_prompts, supported_suffixes
from abliterate.prompts.loaders import COMMON_FIELDS, PromptError

SPLIT_SETS = ("harmful", "harmless")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _error(source, **kwargs) -> str:
    """Load ``source`` expecting a PromptError; return its message after checking it is one line."""
    with pytest.raises(PromptError) as info:
        load_prompts(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --------------------------------------------------------------------------- built-in sets: size and balance


@pytest.mark.parametrize("name", SPLIT_SETS)
def test_split_sets_have_at_least_330_prompts(name):
    assert len(builtin(name)) >= 330


def test_overrefusal_has_at_least_120_prompts_each_containing_its_trigger():
    records = builtin_records("overrefusal")
    assert len(records) >= 120
    for r in records:
        assert set(r) == {"prompt", "category", "trigger"}
        assert r["trigger"].split()[0].lower() in r["prompt"].lower(), r


@pytest.mark.parametrize("name", SPLIT_SETS)
def test_split_sets_span_at_least_12_categories_each_present_in_every_split(name):
    records = builtin_records(name)
    categories = {r["category"] for r in records}
    assert len(categories) >= 12
    for split in ("train", "val", "test"):
        assert {r["category"] for r in records if r["split"] == split} == categories, split


@pytest.mark.parametrize("name", SPLIT_SETS)
def test_splits_are_about_60_20_20_and_stratified_by_category(name):
    records = builtin_records(name)
    sizes = Counter(r["split"] for r in records)
    assert set(sizes) == {"train", "val", "test"}
    total = len(records)
    assert 0.55 <= sizes["train"] / total <= 0.65
    assert 0.15 <= sizes["val"] / total <= 0.25
    assert 0.15 <= sizes["test"] / total <= 0.25
    for category in {r["category"] for r in records}:
        per = Counter(r["split"] for r in records if r["category"] == category)
        assert per["train"] > per["val"] and per["train"] > per["test"], category


@pytest.mark.parametrize("name", SPLIT_SETS)
def test_splits_are_disjoint_and_together_make_the_whole_set(name):
    parts = {split: builtin(name, split) for split in ("train", "val", "test")}
    for a, b in itertools.combinations(parts.values(), 2):
        assert not set(a) & set(b)
    assert sorted(itertools.chain.from_iterable(parts.values())) == sorted(builtin(name))


@pytest.mark.parametrize("name", SPLIT_SETS)
def test_split_set_records_have_prompt_category_and_split(name):
    for r in builtin_records(name):
        assert set(r) == {"prompt", "category", "split"}
        assert r["split"] in {"train", "val", "test"}
        assert r["prompt"] == r["prompt"].strip() and r["category"]


def test_no_prompt_appears_twice_within_or_across_builtin_sets():
    everything = [p.lower() for name in BUILTIN_NAMES for p in builtin(name)]
    assert [p for p, n in Counter(everything).items() if n > 1] == []


def test_no_near_duplicate_prompts_across_builtin_sets():
    prompts = [p for name in BUILTIN_NAMES for p in builtin(name)]
    words = [_words(p) for p in prompts]
    close = [
        (prompts[i], prompts[j])
        for i, j in itertools.combinations(range(len(prompts)), 2)
        if len(words[i] & words[j]) / len(words[i] | words[j]) >= 0.75
    ]
    assert close == []


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_prompts_are_5_to_40_words(name):
    lengths = [len(p.split()) for p in builtin(name)]
    assert min(lengths) >= 5 and max(lengths) <= 40


def test_harmful_and_harmless_have_similar_lengths_so_length_does_not_separate_them():
    mean = {name: sum(len(p.split()) for p in builtin(name)) / len(builtin(name)) for name in SPLIT_SETS}
    assert abs(mean["harmful"] - mean["harmless"]) / mean["harmful"] < 0.15


def test_general_text_is_3000_to_5000_words_of_paragraphs():
    text = general_text()
    assert 3000 <= len(text.split()) <= 5000
    assert text.count("\n\n") >= 30  # many paragraphs, not one blob


def test_builtin_data_is_reachable_through_importlib_resources():
    data = resources.files("abliterate.prompts") / "data"
    for filename in ("harmful.jsonl", "harmless.jsonl", "overrefusal.jsonl", "general_text.txt"):
        assert (data / filename).is_file(), filename


def test_builtin_results_are_copies_so_callers_cannot_corrupt_the_cache():
    builtin("harmful").clear()
    builtin_records("harmful")[0]["prompt"] = "changed"
    assert len(builtin("harmful")) >= 330
    assert builtin_records("harmful")[0]["prompt"] != "changed"


def test_builtin_rejects_unknown_names_and_splits_and_splitting_overrefusal():
    with pytest.raises(PromptError, match=r"unknown built-in prompt set 'harmfull'.*harmful, harmless, overrefusal"):
        builtin("harmfull")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="unknown split 'dev'"):
        builtin("harmful", "dev")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="no train/val/test splits"):
        builtin("overrefusal", "train")


# --------------------------------------------------------------------------- load_prompts: builtin: names


def test_load_prompts_reads_builtin_names_with_optional_split():
    assert load_prompts("builtin:harmful") == builtin("harmful")
    assert load_prompts("builtin:harmless:train") == builtin("harmless", "train")
    assert load_prompts("builtin:harmless", split="val") == builtin("harmless", "val")
    assert load_prompts("builtin:harmless:test", split="test") == builtin("harmless", "test")


def test_load_prompts_refuses_conflicting_builtin_splits():
    assert "give only one" in _error("builtin:harmful:train", split="test")


def test_load_prompts_names_the_builtin_sets_for_an_unknown_one():
    assert "choose one of: harmful, harmless, overrefusal" in _error("builtin:nice")


# --------------------------------------------------------------------------- load_prompts: file formats


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_txt_gives_one_prompt_per_line_stripped_blank_lines_skipped_duplicates_kept(tmp_path):
    path = _write(tmp_path, "p.txt", "  first prompt \n\nsecond prompt\n   \nfirst prompt\n")
    assert load_prompts(path) == ["first prompt", "second prompt", "first prompt"]


def test_txt_accepts_a_path_object_or_a_string_and_a_utf8_bom(tmp_path):
    path = _write(tmp_path, "p.txt", "\ufeffhéllo wörld\n".encode())
    assert load_prompts(path) == load_prompts(str(path)) == ["héllo wörld"]


def test_json_list_of_strings(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps(["a b", " c d ", ""]))
    assert load_prompts(path) == ["a b", "c d"]


def test_json_list_of_objects_uses_a_common_field_name(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([{"instruction": "x y", "id": 1}, {"instruction": "z", "id": 2}]))
    assert load_prompts(path) == ["x y", "z"]


def test_json_list_of_objects_uses_the_field_given(tmp_path):
    rows = [{"prompt": "not this", "rewrite": "this one"}]
    assert load_prompts(_write(tmp_path, "p.json", json.dumps(rows)), field="rewrite") == ["this one"]


def test_json_field_matches_column_case_insensitively_when_unique(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([{"Goal": "g1"}, {"Goal": "g2"}]))
    assert load_prompts(path) == ["g1", "g2"]
    assert load_prompts(path, field="goal") == ["g1", "g2"]


def test_json_object_holding_a_single_list_is_unwrapped(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps({"name": "mine", "data": [{"prompt": "p1"}, {"prompt": "p2"}]}))
    assert load_prompts(path) == ["p1", "p2"]


def test_json_object_with_several_lists_needs_field_naming_one(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps({"harmful": ["h1", "h2"], "harmless": ["s1"]}))
    message = _error(path)
    assert "several lists ('harmful', 'harmless')" in message and "--field" in message
    assert load_prompts(path, field="harmless") == ["s1"]


def test_json_scalar_top_level_is_refused(tmp_path):
    assert "expected a list of prompts" in _error(_write(tmp_path, "p.json", '"just one string"'))


def test_json_mixed_strings_and_objects_are_refused(tmp_path):
    assert "all strings or all objects" in _error(_write(tmp_path, "p.json", json.dumps(["a", {"prompt": "b"}])))


def test_json_non_text_value_in_the_prompt_field_names_the_entry(tmp_path):
    path = _write(tmp_path, "p.json", json.dumps([{"prompt": "ok"}, {"prompt": 7}]))
    assert "entry 2 has a int in field 'prompt'" in _error(path)


def test_jsonl_objects_and_strings(tmp_path):
    rows = [{"text": "one"}, {"text": " two "}, {"text": None}]
    path = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_prompts(path) == ["one", "two"]
    path = _write(tmp_path, "s.jsonl", '"alpha"\n"beta"\n')
    assert load_prompts(path) == ["alpha", "beta"]


def test_jsonl_split_argument_filters_on_a_split_field(tmp_path):
    rows = [{"prompt": f"p{i}", "split": s} for i, s in enumerate(["train", "val", "train", "test"])]
    path = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert load_prompts(path, split="train") == ["p0", "p2"]
    assert load_prompts(path) == ["p0", "p1", "p2", "p3"]


def test_split_argument_on_a_file_without_split_field_is_refused(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a"}\n')
    assert "no 'split' field" in _error(path, split="train")


def test_split_argument_with_no_matching_entries_lists_the_splits_found(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a", "split": "train"}\n')
    assert "no entries in split 'test'; splits found: train" in _error(path, split="test")


def test_csv_column_auto_detected_with_quoted_commas_and_newlines(tmp_path):
    content = 'id,prompt,category\n1,"Hello, world",x\n2,"two\nlines",y\n3,,z\n'
    assert load_prompts(_write(tmp_path, "p.csv", content)) == ["Hello, world", "two\nlines"]


def test_csv_field_selects_the_column_and_a_bom_is_ignored(tmp_path):
    path = _write(tmp_path, "p.csv", "\ufeffquestion,answer\nq1,a1\nq2,a2\n".encode())
    assert load_prompts(path) == ["q1", "q2"]
    assert load_prompts(path, field="answer") == ["a1", "a2"]


def test_tsv_is_read_like_csv(tmp_path):
    assert load_prompts(_write(tmp_path, "p.tsv", "goal\tx\nfirst, with comma\t1\n")) == ["first, with comma"]


def test_parquet_column_is_read(tmp_path):
    import pyarrow as pa  # in the dev extra: this runs for real, never skipped
    import pyarrow.parquet as pq
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", " b ", None], "n": [1, 2, 3]}), path)
    assert load_prompts(path) == ["a", "b"]
    assert "fields found: 'prompt', 'n'" in _error(path, field="missing")


def test_parquet_without_pyarrow_says_pip_install_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = _write(tmp_path, "p.parquet", b"PAR1 not really parquet")
    assert "pip install pyarrow" in _error(path)


def test_every_advertised_suffix_has_a_loader():
    assert set(supported_suffixes()) >= {".txt", ".json", ".jsonl", ".csv", ".parquet"}


def test_suffix_matching_ignores_case(tmp_path):
    assert load_prompts(_write(tmp_path, "P.TXT", "upper\n")) == ["upper"]


# --------------------------------------------------------------------------- load_prompts: errors


def test_missing_file_is_named(tmp_path):
    message = _error(tmp_path / "absent.txt")
    assert "absent.txt" in message and "not found" in message


def test_empty_file_is_reported_as_empty(tmp_path):
    assert "file is empty" in _error(_write(tmp_path, "p.txt", ""))


@pytest.mark.parametrize(
    ("name", "content"),
    [("p.txt", "\n  \n"), ("p.json", "[]"), ("p.jsonl", "\n\n"), ("p.csv", "prompt,id\n")],
)
def test_file_without_prompts_is_reported(tmp_path, name, content):
    assert "contains no prompts" in _error(_write(tmp_path, name, content))


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    message = _error(_write(tmp_path, "p.docx", "x"))
    assert "unsupported file type '.docx'" in message
    for suffix in (".txt", ".json", ".jsonl", ".csv", ".parquet", "builtin:", "hf:"):
        assert suffix in message


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    assert "is a directory" in _error(tmp_path / "dir.txt")


def test_missing_field_lists_the_fields_found(tmp_path):
    path = _write(tmp_path, "p.csv", "body,label\nhello,1\n")
    message = _error(path)
    assert "none of the usual prompt fields" in message and "'body', 'label'" in message and "--field" in message
    message = _error(path, field="prompt")
    assert "no field 'prompt'" in message and "'body', 'label'" in message


def test_several_candidate_fields_are_refused_rather_than_guessed(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a", "text": "b"}\n')
    message = _error(path)
    assert "several possible prompt fields ('prompt', 'text')" in message and "--field" in message
    assert load_prompts(path, field="text") == ["b"]


def test_invalid_json_reports_the_position(tmp_path):
    assert "invalid JSON at line 2" in _error(_write(tmp_path, "p.json", '[\n"a",,\n]'))


def test_invalid_jsonl_reports_the_line_number(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n\n{"prompt": broken}\n')
    assert "invalid JSON on line 3" in _error(path)


def test_non_utf8_file_is_reported(tmp_path):
    assert "not valid UTF-8" in _error(_write(tmp_path, "p.txt", b"caf\xe9\n"))


def test_fewer_than_min_count_prompts_is_refused_with_both_numbers(tmp_path):
    path = _write(tmp_path, "p.txt", "a\nb\nc\n")
    assert load_prompts(path, min_count=3) == ["a", "b", "c"]
    assert "found 3 prompts, need at least 8" in _error(path, min_count=8)


def test_min_count_below_one_is_a_programming_error():
    with pytest.raises(ValueError, match="min_count"):
        load_prompts("builtin:harmful", min_count=0)


def test_prompt_error_is_a_value_error_and_an_abliterate_error():
    assert issubclass(PromptError, ValueError) and issubclass(PromptError, AbliterateError)
    assert str(PromptError("two\nlines")) == "two lines"


def test_unknown_split_argument_is_refused():
    assert "unknown split 'dev'" in _error("builtin:harmful", split="dev")


# --------------------------------------------------------------------------- hf: datasets (never touches the network)


def test_hf_without_datasets_installed_says_pip_install_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install datasets" in _error("hf:someone/prompts")


@pytest.mark.parametrize("spec", ["hf:justname", "hf:a/b/c", "hf:owner/name:", "hf:a/b:c:d:e"])
def test_hf_malformed_reference_shows_the_accepted_forms(spec):
    assert "hf:OWNER/NAME" in _error(spec)


@pytest.fixture
def local_hub_dataset(tmp_path, monkeypatch) -> Path:
    """A dataset folder `org/prompts` (a train and a test split, parquet and JSON Lines) in the working directory:
    the real `datasets.load_dataset("org/prompts")` reads a local folder of that name; the Hub is switched off."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "org" / "prompts" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"goal": ["pick a lock", " hotwire a car "], "category": ["a", "b"]}),
                   folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"goal": ["forge a check"], "category": ["c"]}), folder / "test-00000-of-00001.parquet")
    return folder


def test_hf_dataset_loads_with_the_real_datasets_package_from_local_files(local_hub_dataset):
    assert load_prompts("hf:org/prompts:train") == ["pick a lock", "hotwire a car"]
    assert load_prompts("hf:org/prompts", split="test") == ["forge a check"]
    assert load_prompts("hf:org/prompts:train", field="category") == ["a", "b"]
    assert "dataset has splits" in _error("hf:org/prompts") and "hf:org/prompts:train" in _error("hf:org/prompts")


class _FakeDataset:
    """Stands in for datasets.Dataset: column_names and column access are all the loader uses."""

    def __init__(self, columns: dict[str, list]):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, column: str) -> list:
        return self._columns[column]


@pytest.fixture
def fake_datasets(monkeypatch):
    """Install a fake ``datasets`` module recording calls; tests set ``module.result`` to what it returns."""
    module = types.ModuleType("datasets")
    module.calls = []  # type: ignore[attr-defined]

    def load_dataset(path, name=None, split=None):
        module.calls.append((path, name, split))  # type: ignore[attr-defined]
        result = module.result  # type: ignore[attr-defined]
        if isinstance(result, Exception):
            raise result
        return result

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_hf_picks_the_first_common_column_and_passes_split_and_config(fake_datasets):
    fake_datasets.result = _FakeDataset({"Goal": ["g1", " g2 "], "Behavior": ["b1", "b2"], "text": ["t1", "t2"]})
    assert load_prompts("hf:org/bench:behaviors:harmful") == ["g1", "g2"]
    assert fake_datasets.calls == [("org/bench", "behaviors", "harmful")]


def test_hf_field_and_split_argument_are_used(fake_datasets):
    fake_datasets.result = _FakeDataset({"prompt": ["p"], "target": ["t"]})
    assert load_prompts("hf:org/set", field="target", split="test") == ["t"]
    assert fake_datasets.calls == [("org/set", None, "test")]


def test_hf_dataset_dict_with_one_split_is_used_and_with_several_is_refused(fake_datasets):
    fake_datasets.result = {"train": _FakeDataset({"prompt": ["only"]})}
    assert load_prompts("hf:org/set") == ["only"]
    fake_datasets.result = {"train": _FakeDataset({"prompt": ["a"]}), "test": _FakeDataset({"prompt": ["b"]})}
    assert "dataset has splits train, test; add one, e.g. hf:org/set:train" in _error("hf:org/set")


def test_hf_missing_column_lists_the_columns(fake_datasets):
    fake_datasets.result = _FakeDataset({"body": ["x"], "label": [0]})
    assert "'body', 'label'" in _error("hf:org/set:train")


def test_hf_load_failure_becomes_one_line_prompt_error(fake_datasets):
    fake_datasets.result = FileNotFoundError("Dataset 'org/none' doesn't exist on the Hub\nor cannot be accessed.")
    message = _error("hf:org/none:train")
    assert "could not load dataset (FileNotFoundError: Dataset 'org/none' doesn't exist on the Hub)" in message


def test_hf_conflicting_splits_are_refused(fake_datasets):
    assert "give only one" in _error("hf:org/set:train", split="test").lower()


def test_common_field_names_are_a_short_ordered_list_starting_with_prompt():
    assert COMMON_FIELDS[0] == "prompt" and len(COMMON_FIELDS) <= 8


def test_hf_works_with_real_datasets_objects_when_installed(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from datasets.table import InMemoryTable

    def dataset(columns: dict[str, list]):
        # A fixed fingerprint skips datasets' dill-based hashing, which is irrelevant here and fragile across versions.
        return datasets.Dataset(InMemoryTable.from_pydict(columns), fingerprint=f"test-{len(columns)}")

    splits = datasets.DatasetDict(
        {
            "train": dataset({"instruction": ["i1", "i2"], "output": ["o1", "o2"]}),
            "test": dataset({"instruction": ["i3"], "output": ["o3"]}),
        }
    )

    def load_dataset(path, name=None, split=None):
        return splits[split] if split else splits

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_prompts("hf:org/set:train") == ["i1", "i2"]
    assert load_prompts("hf:org/set", split="test", field="output") == ["o3"]
    assert "dataset has splits train, test" in _error("hf:org/set")


@pytest.mark.parametrize("name", SPLIT_SETS)
def test_builtin_split_prefix_covers_every_category(name):
    """Extraction takes the first --n-train prompts; the files are grouped by category, so the order interleaves."""
    category = {r["prompt"]: r["category"] for r in builtin_records(name)}
    everyone = set(category.values())
    for split in ("train", "val"):
        prompts = builtin(name, split)
        assert sorted(prompts) == sorted(r["prompt"] for r in builtin_records(name) if r["split"] == split)
        assert {category[p] for p in prompts[: len(everyone)]} == everyone
