import json
import re

import pytest

from ipgo.data import PromptDataModule, PromptFileError, read_prompts


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sleeping"\n2,a dog\n')
    assert read_prompts(tmp_path / "p.csv", column="caption") == ["a cat, sleeping", "a dog"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p, "n": 1}) for p in ["x", "y"]) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["x", "y"]
    # as spreadsheet programs write them: a byte-order mark, CRLF, a quoted field over two lines
    (tmp_path / "excel.csv").write_bytes('\ufeffprompt,id\r\n"a cat\r\non a mat",1\r\na dog,2\r\n'.encode())
    assert read_prompts(tmp_path / "excel.csv") == ["a cat\r\non a mat", "a dog"]
    (tmp_path / "bom.txt").write_bytes("\ufeffa cat\r\na dog\u2028at night\r\n".encode())
    assert read_prompts(tmp_path / "bom.txt") == ["a cat", "a dog\u2028at night"]  # only newlines split prompts


def test_empty_cells_are_skipped_with_a_warning(tmp_path):
    """Blank lines of a .txt file are layout; an empty cell of a table is a row without a prompt: said, by row."""
    (tmp_path / "p.csv").write_text('id,prompt\n1,a cat\n2\n3,a dog\n4,"  "\n')  # row 2 lacks the cell
    with pytest.warns(UserWarning, match=re.escape("p.csv: 2 rows have an empty 'prompt' (line 3, line 5), skipped")):
        assert read_prompts(tmp_path / "p.csv") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": ""}\n')
    with pytest.warns(UserWarning, match=re.escape("p.jsonl: 1 row has an empty 'prompt' (line 2), skipped")):
        assert read_prompts(tmp_path / "p.jsonl") == ["a cat"]


@pytest.mark.parametrize(("name", "text", "column", "message"), [
    ("p.csv", "id,caption\n1,a\n", "text", "no column 'text'; its columns are ['caption', 'id']"),
    ("p.jsonl", '{"prompt": "a"}\n{oops\n', None, "line 2 is not valid JSON"),
    ("p.txt", "a cat\n", "prompt", "which has no columns: leave the column unset"),
    ("p.json", "[]", None, "use .txt, .csv or .jsonl"),
    ("p.txt", " \n\n", None, "has no prompts"),
    ("p.txt", "a cat\n\na dog\na cat\n", None, "p.txt: line 4 ('a cat') repeats line 1;"),  # the file's lines
    ("p.txt", "a photo of a cat\nA photo of a  cat\n", None,
     "line 2 ('A photo of a  cat') repeats line 1 but for case or spacing ('a photo of a cat')"),
    ("p.csv", "prompt\na cat\n\n\"\"\na cat\n", None, "p.csv: line 5 ('a cat') repeats line 2;"),
    ("p.csv", "id,caption\n1,a,extra\n", "text", "no column 'text'; its columns are ['caption', 'id']"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"text": "b"}\n', None, "line 3 has no 'prompt'"),
    ("p.jsonl", '"a cat"\n', None, "line 1 is not a JSON object"),
])
def test_bad_prompt_files(tmp_path, name, text, column, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptFileError, match=re.escape(message)):
        read_prompts(tmp_path / name, column)
    with pytest.raises(PromptFileError, match="does not exist: check"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(PromptFileError, match="relative paths are read from the current folder"):
        read_prompts("missing/prompts.txt")


def test_split_is_disjoint_deterministic_and_complete(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(10)))
    first, second = (PromptDataModule(str(path), val_fraction=0.3, split_seed=1) for _ in range(2))
    first.setup()
    second.setup()
    assert first.val_prompts == second.val_prompts and len(first.val_prompts) == 3
    assert sorted(first.train_prompts + first.val_prompts) == sorted(f"prompt {i}" for i in range(10))
    batch = next(iter(first.train_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["prompt"][0] == first.train_prompts[0]
    limited = PromptDataModule(str(path), limit=2)
    limited.setup()
    assert limited.train_prompts == ["prompt 0", "prompt 1"] and limited.val_dataloader() == []
    with pytest.raises(ValueError, match="empty split"):
        PromptDataModule(str(path), limit=1, val_fraction=0.2).setup()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        PromptDataModule(str(path), limit=0)


def test_shuffled_orders_depend_on_seed_and_epoch_only():
    from ipgo.data import EpochShuffle

    def order(seed, epoch):
        sampler = EpochShuffle(10, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3) and sorted(order(0, 3)) == list(range(10))
    assert order(0, 0) != order(0, 1) and order(0, 1) != order(1, 1)
