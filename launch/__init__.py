"""Launch surfaces: the Python API, the CLI, ``ray job`` entry points and SLURM rendering.

Everything the user types becomes one :class:`~tessera.runtime.config.JobSpec` here;
nothing else parses arguments.
"""
