"""Footprints, cluster inventory, the planner, expert affinity and placement, the KV cache."""
