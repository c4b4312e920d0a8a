"""Fuzzing: property tests of the heartbeat decoder and the control protocol (docs/fuzzing.md)."""
