"""The benchmarks' output: rows as a markdown table, and the table plus a CSV of every field on disk.

Dependency-free, so that both the JAX benchmarks and the PyTorch one (run where JAX may be absent) use it.
"""

import csv
import math
import os


def cell(row, key: str, fmt: str, *, empty: str = '-') -> str:
  """`row[key]` formatted with `fmt`; `empty` when it is missing, blank or not finite."""
  value = row.get(key)
  if value is None or value == '' or isinstance(value, float) and not math.isfinite(value):
    return empty
  return fmt.format(value)


def render_markdown(rows, columns, *, empty_as=None) -> str:
  """A markdown table of `rows` ({field: value}) under `columns` ((header, field, format) triples).

  Args:
    rows: the rows; one whose 'error' is set keeps its identifying cells and shows the error last.
    columns: (header, field, format string) per column.
    empty_as: {field: text} shown for an empty value of that field instead of '-'.
  """
  empty_as = empty_as or {}
  lines = ['| ' + ' | '.join(header for header, _, _ in columns) + ' |',
           '|' + '---|' * len(columns)]
  for row in rows:
    cells = [cell(row, key, fmt, empty=empty_as.get(key, '-')) for _, key, fmt in columns]
    if row.get('error'):
      cells[-1] = f'failed: {row["error"]}'
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_markdown_and_csv(md_path: str, csv_path: str, table: str, rows, csv_fields, notes=()):
  """Writes the notes then `table` to `md_path`, and every `csv_fields` of `rows` to `csv_path`."""
  os.makedirs(os.path.dirname(md_path) or '.', exist_ok=True)
  with open(md_path, 'w') as f:
    f.write(''.join(f'{line}\n' for line in notes) + ('\n' if notes else '') + table)
  with open(csv_path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=csv_fields, restval='', extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def publish(out_dir: str, name: str, rows, columns, csv_fields, notes=()) -> str:
  """Prints the notes and the table of `rows`, and writes them to `<out_dir>/<name>.md` and `.csv`.

  Returns:
    The markdown table.
  """
  md_path, csv_path = os.path.join(out_dir, f'{name}.md'), os.path.join(out_dir, f'{name}.csv')
  table = render_markdown(rows, columns)
  write_markdown_and_csv(md_path, csv_path, table, rows, csv_fields, notes)
  print('\n'.join(notes) + '\n\n' + table)
  print(f'Wrote {md_path} and {csv_path}.')
  return table
