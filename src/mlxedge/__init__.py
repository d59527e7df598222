"""mlxedge."""
