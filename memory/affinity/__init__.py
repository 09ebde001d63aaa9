"""Expert affinity: routing traces, transition statistics, placement solvers, load balance."""
