"""The YAML limits: an alias bomb, deep nesting and oversize text are refused before they cost anything;
ordinary anchors (a shared data block) still load."""

from __future__ import annotations

import pytest

from icd_core.safe_yaml import MAX_EXPANDED_NODES, YamlRefused, load_yaml


def alias_bomb(levels: int = 9, fan: int = 10) -> str:
    """The 'billion laughs' shape: each level lists the previous one `fan` times (fan**levels leaves)."""
    lines = ['a0: &a0 ["x"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_by_its_expanded_size() -> None:
    text = alias_bomb(6)  # 10**6 leaves in a few hundred bytes
    assert len(text) < 500
    with pytest.raises(YamlRefused, match="expands to more than"):
        load_yaml(text)


def test_a_small_expansion_still_loads() -> None:
    data = load_yaml(alias_bomb(2))
    assert data["a2"] == [[["x"]] * 10] * 10
    assert 100 < MAX_EXPANDED_NODES


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize(("opening", "closing"), [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_refused_without_recursing(depth: int, opening: str, closing: str) -> None:
    with pytest.raises(YamlRefused, match="nested more than"):
        load_yaml(opening * depth + "1" + closing * depth)


def test_anchors_in_a_spec_file_work_and_malformed_text_says_so() -> None:
    spec = load_yaml("shared: &d {format: shapes, num_images: 8}\ndata: {train: *d, val: *d}\n")
    assert spec["data"]["train"] == spec["data"]["val"] == {"format": "shapes", "num_images": 8}
    with pytest.raises(YamlRefused, match="invalid YAML"):
        load_yaml("a: [1, 2\nb: }")
    with pytest.raises(YamlRefused, match="characters"):
        load_yaml("#" * 1_000_001)
    assert load_yaml("") is None


def test_deep_block_nesting_is_refused_too() -> None:
    """Indentation nests without brackets: the event scan catches what the bracket count cannot."""
    text = "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 200))
    with pytest.raises(YamlRefused, match="nested more than"):
        load_yaml(text)
