"""jaxalign.rewards: answer extraction, numeric matching, format / length / overlong rewards.

Plain Python, no JAX: every reward has TRL's signature and returns one float per completion.
"""

import pytest

from jaxalign import rewards


@pytest.mark.parametrize("text, expected", [
    ("37 + 48 = 85", "85"),
    ("so the result is \\boxed{\\frac{3}{4}} indeed", "(3)/(4)"),
    ("\\boxed{12} and later 13", "12"),                 # the box wins over a later number
    ("\\boxed{x^{2}}", "x^{2}"),                         # nested braces
    ("work: 3 * 4 = 12\n#### 1,234 then 7", "1,234"),  # GSM8K's marker wins over the last number
    ("It is -7.", "-7"),
    ("10 - 5 = 5", "5"),
    ("a half is 1/2", "1/2"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert rewards.extract_answer(text) == expected


@pytest.mark.parametrize("predicted, reference, equal", [
    ("85", "85", True), ("85", 85, True), ("85.0", "85", True), ("0.75", "3/4", True),
    ("(3)/(4)", "0.75", True), ("1,234", "1234", True), ("$12", "12", True),
    ("50%", "50", True), ("85.0000001", "85", True), ("85.01", "85", False),
    ("84", "85", False), ("-7", "7", False), (None, "1", False), ("1", None, False),
    ("7", "She has 3 + 4 = 7 apples.\n#### 7", True),   # a GSM8K solution as the reference
    ("blue", "blue", True), ("blue", "red", False),      # non-numbers compare as text
    ("1/0", "0", False),
])
def test_answers_match(predicted, reference, equal):
    assert rewards.answers_match(predicted, reference) is equal


def test_math_answer_scores_one_per_completion():
    completions = ["13 + 7 = 20", "The answer is 21.", "\\boxed{20}", "no idea", "20/1"]
    got = rewards.math_answer(["q"] * 5, completions, answer=["20"] * 5, completion_ids=[[1]] * 5,
                              extra_column=[0] * 5)  # unknown columns are ignored
    assert got == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):  # one answer per completion
        rewards.math_answer(["q"], ["1", "2"], answer=["1"])


def test_format_reward_search_and_full_match():
    r1 = rewards.format_reward(r"<think>.*</think>\s*<answer>.*</answer>", full_match=True)
    texts = ["<think>a\nb</think> <answer>3</answer>", "x <think>a</think><answer>3</answer>",
             "<answer>3</answer>"]
    assert r1(None, texts) == [1.0, 0.0, 0.0]
    assert rewards.format_reward(r"answer is \d+", reward=0.5)(None, ["the answer is 4", "4"]) == [
        0.5, 0.0]
    assert rewards.reward_name(r1) == "format_reward"


def test_length_penalty_counts_tokens_past_the_budget():
    fn = rewards.length_penalty(coef=0.5, free_tokens=2)
    assert fn(None, ["a", "b", "c"], completion_ids=[[1], [1, 2, 3], [1] * 6]) == [0.0, -0.5, -2.0]
    assert fn(None, ["abcd"]) == [-1.0]  # characters when no token ids are passed


def test_overlong_penalty_is_dapo_eq13():
    """R = 0 up to L_max − L_cache, then linear down to −1 at L_max, −1 beyond."""
    fn = rewards.overlong_penalty(max_length=10, cache_length=4)
    lengths = [0, 6, 7, 8, 10, 11]
    got = fn(None, [""] * 6, completion_ids=[[0] * n for n in lengths])
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache_length"):
        rewards.overlong_penalty(max_length=4, cache_length=5)


def test_reward_name_of_partial_and_callable():
    import functools

    assert rewards.reward_name(functools.partial(rewards.math_answer)) == "math_answer"

    class Scorer:
        def __call__(self, prompts, completions, **columns):
            return [0.0] * len(completions)

    assert rewards.reward_name(Scorer()) == "Scorer"


def test_rewards_module_imports_no_jax():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(rewards.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"jax", "jaxlib", "flax", "numpy"}, imported
