"""One file per model family: its modules, its checkpoint name map and its parallel plan."""
