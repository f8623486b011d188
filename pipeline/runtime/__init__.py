"""The multiprocess runtime: supervisor, stage processes, rings, shared memory, control
plane and the topology they run."""
