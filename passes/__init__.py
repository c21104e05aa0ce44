"""Graph-surgery passes: each takes a graph and returns a graph plus what it did."""
