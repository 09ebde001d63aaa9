"""How one module is split across one mesh dim: tensor, pipeline, expert, patch, sequence, CFG."""
