"""The toy safety world: procedural prompts and images with exact ground truth (SPEC section 6)."""
