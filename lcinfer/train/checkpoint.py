"""Training checkpoints: an orbax `CheckpointManager` over DIR/<step>/{state, meta}.

  state  orbax StandardSave of {"params": {name: array}, "opt_state": {name: array}, "rng": key data}
         (trainable parameters only; names are dotted paths, e.g. "model.layers.0.mlp.up_proj.weight",
         "1.0.mu.model.norm.weight" for an Adam moment)
  meta   JSON: format, version, step, train config, model config, data source description,
         frozen parameter names, elapsed seconds

Saves are asynchronous (arrays are copied to host before `save` returns, then written in the
background), the newest `keep` checkpoints are kept, and a step directory only appears once its
write is complete, so a process killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

from pathlib import Path

from lcinfer.errors import CheckpointError

FORMAT = "lcinfer-train"
FORMAT_VERSION = 1


class TrainCheckpoints:
  def __init__(self, directory: str | Path, *, keep: int | None, async_save: bool = True):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = Path(directory).absolute()
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointError(f"checkpoint_dir {self.directory} exists and is not a directory")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=async_save, create=True)
    # Declared handlers: without them a fresh manager cannot read an item's metadata before restoring it.
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: dict, meta: dict) -> None:
    ocp = self._ocp
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                    force=True)

  def read_meta(self, step: int) -> dict:
    ocp = self._ocp
    where = self.directory / str(step)
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many kinds; all mean the same to a user
      raise CheckpointError(f"cannot read {where}/meta: {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise CheckpointError(f"{where} is not an lcinfer training checkpoint (meta format {meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
      raise CheckpointError(f"{where} was written by a newer lcinfer (format {meta['version']}); upgrade lcinfer")
    return meta

  def stored_arrays(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params.<name>" / "opt_state.<name>" / "rng": (shape, dtype)} of a saved state."""
    try:
      md = self._mngr.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"cannot read {self.directory / str(step)}/state metadata: {type(e).__name__}: "
                            f"{str(e)[:300]}") from None
    tree = getattr(md, "tree", md)
    out = {}
    for group, sub in dict(tree).items():
      if hasattr(sub, "shape"):
        out[group] = (tuple(sub.shape), str(sub.dtype))
        continue
      for name, m in dict(sub).items():
        out[f"{group}.{name}"] = (tuple(m.shape), str(m.dtype))
    return out

  def restore(self, step: int, abstract_state: dict) -> dict:
    """The saved state, each array placed on the sharding of its ShapeDtypeStruct in `abstract_state`."""
    ocp = self._ocp
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:
      raise CheckpointError(f"cannot restore {self.directory / str(step)}/state: {type(e).__name__}: "
                            f"{str(e)[:300]}; the checkpoint is corrupt or incomplete") from None

  def wait(self) -> None:
    """Block until every asynchronous save is on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
