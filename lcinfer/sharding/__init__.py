"""Sharding by logical axis names, meshes, and (later) sequence-parallel prefill and TPLA."""

from lcinfer.sharding.rules import (DEFAULT_RULES, MESH_AXES, constrain, make_mesh, named_sharding,
                                    spec_for, use_mesh)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "constrain", "make_mesh", "named_sharding", "spec_for", "use_mesh"]
