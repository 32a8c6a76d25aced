"""The package's import graph has no cycle, imports inside functions included, and the
library never imports the command-line module."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'patchmerger'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _targets(node: ast.AST, modules: set[str]) -> list[str]:
  """The package modules an import statement loads (`from a import b` loads a.b when
  b is a module, else a)."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
             else node.module for alias in node.names]
  else:
    return []
  found = []
  for name in names:  # `import a.b.c` loads the deepest module that exists.
    while name and name not in modules:
      name = name.rpartition('.')[0]
    if name:
      found.append(name)
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere in its body."""
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in files.items():
    tree = ast.parse(path.read_text(), str(path))
    graph[name] = {target for node in ast.walk(tree)
                   for target in _targets(node, set(files)) if target != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle as [a, b, ..., a], or [] when the graph has none."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 'open':
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return []

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return []


def test_the_cycle_finder_finds_cycles_and_function_level_imports(tmp_path):
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) == []
  source = 'import os\n\ndef f():\n  from patchmerger.data import local\n'
  tree = ast.parse(source)
  modules = {'patchmerger.data', 'patchmerger.data.local'}
  assert [t for n in ast.walk(tree) for t in _targets(n, modules)] == ['patchmerger.data.local']


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert 'patchmerger.training.setup' in graph['patchmerger.evaluate']  # The graph is read.
  assert find_cycle(graph) == []


def test_the_library_never_imports_the_command_line_module():
  importers = [name for name, targets in import_graph().items() if 'patchmerger.cli' in targets]
  assert importers == []
