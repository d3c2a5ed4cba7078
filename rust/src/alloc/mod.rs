//! Allocation solvers (issue 3): how many KV groups and MLP channels each layer keeps.
