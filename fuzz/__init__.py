"""Coverage-guided fuzzing of the code that reads untrusted bytes (docs/fuzzing.md)."""
