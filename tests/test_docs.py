"""The docs cannot drift from the code: every fenced command in README.md and docs/*.md
is parsed (never run) and checked against the code, and every relative link resolves.

- the flags of `train.py`, `eval.py`, `sweep.py`, `benchmarks/*.py` and `python -m
  <our module>` commands exist (read from the scripts' and their imports' DEFINE_ calls);
- a `--config=FILE:ARGS` names a real file whose get_config takes ARGS;
- every `--config.X=...` override and `--sweep=X=...` key names a real config field;
- every relative link and image points at a file, and an #anchor at one of its headings.
"""
import ast
import functools
import glob
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
# absl's own flags, valid for every script.
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'helpxml', 'flagfile', 'undefok', 'logtostderr',
              'alsologtostderr', 'log_dir', 'verbosity', 'v', 'stderrthreshold',
              'showprefixforinfo', 'only_check_args'}
SHELL_LANGUAGES = ('', 'bash', 'sh', 'shell', 'console')


def _fenced_blocks(text: str):
  for match in re.finditer(r'^[ \t]*```([^\n`]*)\n(.*?)^[ \t]*```', text, re.M | re.S):
    if match.group(1).strip().lower() in SHELL_LANGUAGES:
      yield match.group(2)


def _commands(block: str):
  """Token lists of the commands in a shell block (continuations joined, comments,
  pipes and && split off)."""
  block = re.sub(r'\\\n', ' ', block)
  for line in block.splitlines():
    line = line.strip().removeprefix('$ ')
    if not line or line.startswith('#'):
      continue
    lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
    lexer.whitespace_split = True
    lexer.commenters = '#'
    try:
      tokens = list(lexer)
    except ValueError:  # An unbalanced quote: not a command we can read.
      continue
    command = []
    for token in tokens + [';']:
      if token and set(token) <= set(';&|'):
        if command:
          yield command
        command = []
      else:
        command.append(token)


def _python_target(tokens):
  """(script path relative to ROOT, its arguments) of a python command of ours, or None."""
  for i, token in enumerate(tokens):
    if os.path.basename(token) in ('python', 'python3'):
      rest = tokens[i + 1:]
      if rest[:1] == ['-m'] and len(rest) > 1:
        if not rest[1].startswith(('patchmerger', 'benchmarks')):
          return None  # pytest, pip, ...
        path = rest[1].replace('.', '/') + '.py'
        args = rest[2:]
      elif rest and rest[0].endswith('.py') and not rest[0].startswith(('-', '/')):
        path, args = rest[0], rest[1:]
      else:
        return None
      return path, args  # Checked to exist by the test: a renamed script fails it.
  return None


def _module_file(name: str):
  base = os.path.join(ROOT, *name.split('.'))
  for candidate in (base + '.py', os.path.join(base, '__init__.py')):
    if os.path.exists(candidate):
      return candidate
  return None


@functools.lru_cache(maxsize=None)
def _defined_flags(path: str) -> frozenset:
  """Flags defined by the file and the repository modules it imports at module level
  (absl parses flags before main runs, so later imports define none in time)."""
  return frozenset(_collect_flags(path, set()))


def _collect_flags(path: str, seen: set) -> set:
  seen.add(path)
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith('DEFINE') and node.args
        and isinstance(node.args[0], ast.Constant)):
      names.add(node.args[0].value)
  for node in tree.body:
    modules = []
    if isinstance(node, ast.Import):
      modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      modules = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
    for module in modules:
      module_path = _module_file(module)
      if module_path and module_path not in seen:  # Import cycles end here.
        names |= _collect_flags(module_path, seen)
  return names


def _config(config_arg: str):
  """The ConfigDict that --config=FILE:ARGS builds (FILE must exist)."""
  path, _, arg = config_arg.partition(':')
  assert path.startswith('configs/') and os.path.exists(os.path.join(ROOT, path)), path
  module = importlib.import_module(path[:-3].replace('/', '.'))
  return module.get_config(arg or None)


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False
    node = node[part]
  return True


def _doc_commands():
  for doc in DOCS:
    for block in _fenced_blocks(open(doc).read()):
      for tokens in _commands(block):
        target = _python_target(tokens)
        if target:
          yield pytest.param(target[0], target[1],
                             id=f'{os.path.relpath(doc, ROOT)}: {" ".join(tokens)[:90]}')


COMMANDS = list(_doc_commands())


def test_the_docs_hold_commands_to_check():
  scripts = {path for path, _ in (p.values for p in COMMANDS)}
  assert {'train.py', 'eval.py', 'sweep.py'} <= scripts


@pytest.mark.parametrize('script, args', COMMANDS)
def test_every_documented_command_uses_real_flags_and_config_keys(script, args):
  assert os.path.exists(os.path.join(ROOT, script)), f'no script {script}'
  defined = _defined_flags(os.path.join(ROOT, script)) | ABSL_FLAGS
  config = None
  for arg in args:
    if not arg.startswith('--'):
      continue
    name, _, value = arg[2:].partition('=')
    if name.startswith('config.'):
      continue  # Checked below, once the config is known.
    bare = name[2:] if name.startswith('no') and name[2:] in defined else name
    assert bare in defined, f'{script} has no flag --{name}'
    if name == 'config' and '$' not in value and '{' not in value:
      config = _config(value)
  if config is None:  # `eval.py ... --config.X`: X must be a field of the default config.
    if any('$' in a or '{' in a for a in args if a.startswith('--config=')):
      return  # A config the shell builds: its keys cannot be checked.
    config = _config('configs/fashion_mnist.py')
  for arg in args:
    name, _, value = arg[2:].partition('=')
    if arg.startswith('--config.'):
      assert _has_field(config, name[len('config.'):]), f'no config field {name}'
    elif arg.startswith('--sweep=') and not value.startswith('arg.'):
      assert _has_field(config, value.partition('=')[0]), f'no config field in {arg}'


def _slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = re.sub(r'[`*]|\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip().lower())
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(path: str) -> set:
  text = re.sub(r'^[ \t]*```.*?^[ \t]*```', '', open(path).read(), flags=re.M | re.S)
  return {_slug(m.group(1)) for m in re.finditer(r'^#{1,6}\s+(.+?)\s*#*$', text, re.M)}


def _links():
  for doc in DOCS:
    text = re.sub(r'^[ \t]*```.*?^[ \t]*```', '', open(doc).read(), flags=re.M | re.S)
    for match in re.finditer(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)', text):
      target = match.group(1)
      if not re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, mailto:, ...
        yield pytest.param(doc, target, id=f'{os.path.relpath(doc, ROOT)} -> {target}')


@pytest.mark.parametrize('doc, target', list(_links()))
def test_every_relative_link_and_image_resolves(doc, target):
  path, _, anchor = target.partition('#')
  resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
  assert os.path.exists(resolved), f'{target}: no such file'
  if anchor and resolved.endswith('.md'):
    assert anchor in _anchors(resolved), f'{target}: no such heading'


def test_the_checks_catch_drift():
  """The checks above are not vacuous: made-up flags, keys, files and anchors fail."""
  train = os.path.join(ROOT, 'train.py')
  assert 'workdir' in _defined_flags(train) and 'coordinator_address' in _defined_flags(train)
  assert 'no_such_flag' not in _defined_flags(train)
  config = _config('configs/fashion_mnist.py:merger=8@2')
  assert _has_field(config, 'model.reducer.r') and not _has_field(config, 'model.reducer.q')
  with pytest.raises(ValueError, match='Unknown config argument'):
    _config('configs/fashion_mnist.py:mergers=8')
  readme_anchors = _anchors(os.path.join(ROOT, 'README.md'))
  assert readme_anchors and 'no-such-heading' not in readme_anchors
  assert _slug('7. Token reducers side by side') == '7-token-reducers-side-by-side'
  assert _slug('`model.reducer.r` and size_weighted_gap') == 'modelreducerr-and-size_weighted_gap'
  assert [t for t in _commands('X=1 python train.py --a=b \\\n  --c # note\nls | wc')] == [
      ['X=1', 'python', 'train.py', '--a=b', '--c'], ['ls'], ['wc']]
