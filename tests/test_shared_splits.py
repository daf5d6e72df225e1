"""The real published CREMA-D split files parse exactly (skipped without ../shared/data)."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import SHARED_DATA
from preprocess.datasets.cremad import CLASSES, Cremad, label_of

CREMAD = SHARED_DATA / "cremad"
pytestmark = pytest.mark.skipif(not (CREMAD / "train.csv").is_file(),
                                reason=f"the real split files are not at {CREMAD}")


def test_published_cremad_splits_parse_to_6698_and_744_over_six_emotions() -> None:
    recipe = Cremad()
    train = recipe.read_split_file(CREMAD / "train.csv")
    test = recipe.read_split_file(CREMAD / "test.csv")
    assert (len(train), len(test)) == (6698, 744)
    assert not {row.key for row in train} & {row.key for row in test}
    for rows in (train, test):
        assert set(Counter(row.label for row in rows)) == set(range(6))
        assert all(label_of(row.key) == row.label for row in rows)


def test_stat_file_with_bom_and_crlf_names_the_six_emotions() -> None:
    from preprocess.splits import read_text_lines

    assert sorted(read_text_lines(CREMAD / "stat.csv")) == CLASSES
