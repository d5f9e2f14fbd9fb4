"""Every planted bug of the mutation check still matches the code it mutates.

A mutant whose original text has moved or changed would be skipped by the
mutation check instead of testing anything, so a refactor must carry it along.
"""

import collections
import pathlib

from experiments import mutation_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every list the mutation check plants, as it reads them.
ALL = mutation_check.MUTANTS


def test_each_mutant_names_a_file_holding_its_original_text_once():
  missing = [(m.name, m.file) for m in ALL
             if (ROOT / m.file).read_text().count(m.original) != 1]
  assert missing == []


def test_mutant_names_are_unique_and_each_changes_its_text():
  counts = collections.Counter(m.name for m in ALL)
  assert [name for name, count in counts.items() if count > 1] == []
  assert [m.name for m in ALL if m.original == m.mutated] == []


def test_each_mutant_names_test_files_that_exist():
  for m in ALL:
    for test in m.tests:
      assert (ROOT / test.split('::')[0]).is_file(), (m.name, test)
