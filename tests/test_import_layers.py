"""The package's imports flow one way: no cycle between modules, nothing in data/ imports above it.

Read from the source (module-level and function-level imports alike), so a
lazy import that closes a cycle is caught as well as a top-level one.
"""

import pytest
import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'semimeta_jax'
# What data/ may import from the package besides itself: leaves that import nothing of it.
DATA_MAY_IMPORT = {'semimeta_jax.errors', 'semimeta_jax.parallel', 'semimeta_jax.workdir_files'}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that `path` imports (a name imported from a package counts as the package
  unless it is a submodule)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in modules else node.module)
  return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
  paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  modules = set(paths)
  return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in sorted(graph[node]):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert not _cycles({'a': {'b'}, 'b': {'c'}, 'c': set()})


def test_no_module_of_the_package_is_in_an_import_cycle():
  graph = _graph()
  assert 'semimeta_jax.data.pipeline' in graph and graph['semimeta_jax.data.pipeline']
  assert _cycles(graph) == []


def test_data_imports_nothing_of_the_package_above_it():
  graph = _graph()
  upward = {(name, target) for name, targets in graph.items() if name.startswith('semimeta_jax.data')
            for target in targets
            if not target.startswith('semimeta_jax.data') and target not in DATA_MAY_IMPORT}
  assert upward == set()
  for leaf in DATA_MAY_IMPORT:  # Leaves indeed: they import nothing of the package.
    assert graph[leaf] <= {'semimeta_jax.errors'}


@pytest.mark.slow
def test_a_registered_dataset_is_described_and_batched_without_tensorflow():
  program = (
      'import sys\n'
      'for name in ("tensorflow", "tensorflow_datasets"): sys.modules[name] = None\n'
      'from configs import default\n'
      'from semimeta_jax import data\n'
      'from semimeta_jax.data import synthetic\n'
      'synthetic.register("layers_synthetic", num_train=40, num_test=8, image_shape=(4, 4, 1),\n'
      '                   num_classes=2)\n'
      'config = default.get_config()\n'
      'config.data.update(name="layers_synthetic", num_labels=4)\n'
      'config.labeled_batch_size = config.unlabeled_batch_size = config.eval_batch_size = 8\n'
      'print(data.dataset_info(config.data).num_train)\n'
      'inp = data.build_input(config, None, process_index=0, process_count=1)\n'
      'print(inp.train_batch(0)["unlabeled"]["image"].shape)\n')
  repo = str(PACKAGE.parent)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, (repo, os.environ.get('PYTHONPATH')))))
  result = subprocess.run([sys.executable, '-c', program], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split('\n')[:2] == ['40', '(8, 4, 4, 1)']
