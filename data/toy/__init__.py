"""The toy safety world: procedural prompts and images with exact ground truth (docs/toy-world.md)."""
