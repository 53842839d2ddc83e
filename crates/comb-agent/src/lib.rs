//! combd: the per-node agent wiring sources, State and reconcilers
