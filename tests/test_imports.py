"""The package's shape: an import graph in one direction, no circles, stages on top; modules
and functions short enough to read; one registry of data sources.

Every import counts, also those inside functions: a lazy import hides a circle from Python, not
from a reader who has to know which module owns what.
"""

import ast
import pathlib

import igpt_jax

PACKAGE = pathlib.Path(igpt_jax.__file__).parent


def import_graph() -> dict[str, set[str]]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(("igpt_jax", *path.relative_to(PACKAGE).with_suffix("").parts))
    modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom) and node.module in modules:
        for a in node.names:  # `from igpt_jax.data import sources` names a module
          targets.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                      else node.module)
    graph[name] = targets - {name, "igpt_jax"}
  return graph


def cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_cycle_finder_finds_a_circle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
  assert cycles(import_graph()) == []


def test_library_never_imports_a_stage():
  graph = import_graph()
  assert "igpt_jax.stages.prepare" in graph  # the graph sees the stage modules
  offenders = {m: sorted(t for t in targets if t.startswith("igpt_jax.stages"))
               for m, targets in graph.items()
               if not m.startswith("igpt_jax.stages") and m != "igpt_jax.main"}
  assert {m: t for m, t in offenders.items() if t} == {}


def test_palette_is_the_palette_only():
  """palette.py fits, quantizes and reads palettes; it loads no data and writes no workdir."""
  # (tfimport imports TensorFlow quietly for the tf quantizer; it imports nothing of ours.)
  assert import_graph()["igpt_jax.palette"] <= {"igpt_jax.config", "igpt_jax.tfimport"}
  assert import_graph()["igpt_jax.tfimport"] == set()


MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 450
LONG_BY_DESIGN = {"igpt_jax.config.base_config"}  # a listing of every field, one per line


def too_long() -> list[str]:
  out = []
  for path in sorted(PACKAGE.rglob("*.py")):
    module = ".".join(("igpt_jax", *path.relative_to(PACKAGE).with_suffix("").parts))
    text = path.read_text()
    if len(text.splitlines()) > MAX_MODULE_LINES:
      out.append(f"{module}: {len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES and f"{module}.{node.name}" not in LONG_BY_DESIGN:
          out.append(f"{module}.{node.name}: {length} lines")
  return out


def test_no_function_over_80_lines_and_no_module_over_450():
  assert too_long() == []


def test_the_limits_see_a_long_function(tmp_path, monkeypatch):
  (tmp_path / "long.py").write_text("def f():\n" + "  x = 1\n" * 90)
  monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
  assert too_long() == ["igpt_jax.long.f: 91 lines"]


def test_data_sources_are_one_registry_that_the_config_lists():
  """config.CHOICES names the same sources as the registry, and no module outside
  data/sources/ compares data.source with a name."""
  from igpt_jax import config as config_lib
  from igpt_jax.data import sources
  assert set(config_lib.CHOICES["data.source"]) == set(sources.SOURCES)
  for path in PACKAGE.rglob("*.py"):
    if "sources" in path.relative_to(PACKAGE).parts:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Compare):
        text = ast.unparse(node)
        assert not ("data.source" in text or ".source ==" in text), f"{path}: {text}"

