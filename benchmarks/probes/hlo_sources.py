"""Where the ops of a compiled XLA executable come from: per instruction (fusions by their fused
computation's instructions), the lcinfer source lines of its ops, from the stack-frame tables of
the optimized HLO text (FileNames / FunctionNames / FileLocations / StackFrames). A GPU trace's
kernel names are these instruction names with '.' as '_' (a suffix _N for the N-th kernel of one)."""
import re
from collections import Counter

_TABLE = re.compile(r"^(\d+) (.*)$")


def _tables(text: str) -> dict[str, dict[int, str]]:
  tables, name = {}, None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      name = line
      tables[name] = {}
    elif name and (m := _TABLE.match(line)):
      tables[name][int(m.group(1))] = m.group(2)
    elif name and line and not line[0].isdigit():
      name = None
  return tables


def _frame_lines(tables, keep: str) -> dict[int, list[str]]:
  """stack_frame_id -> the 'file:line' of its frames under `keep` (innermost first)."""
  files, locs, frames = (tables.get(k, {}) for k in ("FileNames", "FileLocations", "StackFrames"))
  out = {}
  for fid in frames:
    chain, seen, f = [], set(), fid
    while f in frames and f not in seen:
      seen.add(f)
      m = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", frames[f])
      loc = locs.get(int(m.group(1)), "")
      fm = re.search(r"file_name_id=(\d+).*?line=(\d+)", loc)
      if fm:
        path = files.get(int(fm.group(1)), "").strip('"')
        if keep in path:
          chain.append(f"{path[path.rfind(keep):]}:{fm.group(2)}")
      f = int(m.group(2))
    out[fid] = chain
  return out


def op_sources(text: str, keep: str = "lcinfer/", top: int = 3) -> dict[str, list[str]]:
  """Instruction name ('.' as '_') -> its most frequent innermost `keep` source lines."""
  lines = _frame_lines(_tables(text), keep)
  comps, cur = {}, None
  for line in text.splitlines():
    if m := re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line):
      cur = comps.setdefault(m.group(1), Counter())
    elif cur is not None and (m := re.search(r"stack_frame_id=(\d+)", line)) and lines.get(int(m.group(1))):
      cur[lines[int(m.group(1))][0]] += 1
  out = {}
  for line in text.splitlines():
    if m := re.match(r"^\s+(?:ROOT )?%(\S+) = .*?calls=%([\w.\-]+)", line):
      c = comps.get(m.group(2), Counter())
      out[m.group(1).replace(".", "_").replace("-", "_")] = [s for s, _ in c.most_common(top)]
    elif m := re.match(r"^\s+(?:ROOT )?%(\S+) = .*stack_frame_id=(\d+)", line):
      out.setdefault(m.group(1).replace(".", "_").replace("-", "_"), lines.get(int(m.group(2)), [])[:1])
  return out


def op_lines(text: str, width: int = 160) -> dict[str, str]:
  """Instruction name ('.' as '_') -> its HLO line (shape, opcode, operands; metadata cut), for
  ops without source lines (those an XLA pass made: a rewritten reduce-window, a copy)."""
  out = {}
  for line in text.splitlines():
    if m := re.match(r"^\s+(?:ROOT )?%(\S+) = (.*)$", line):
      out[m.group(1).replace(".", "_").replace("-", "_")] = m.group(2).split(", metadata=")[0][:width]
  return out


def sources_of(kernel: str, sources: dict[str, list[str]]) -> list[str]:
  """The source lines of a trace's kernel name (the longest instruction name it starts with)."""
  best = max((n for n in sources if kernel == n or kernel.startswith(n + "_")), key=len, default=None)
  return sources[best] if best else []
