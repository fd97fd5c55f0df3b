"""Sans-IO replication core: vector clocks, change deltas and causal delivery between hub replicas."""
