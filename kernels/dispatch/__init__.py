"""Permute / unpermute by the mapping table: ops.permute, ops.unpermute and the [E, C, M] buffer forms."""
