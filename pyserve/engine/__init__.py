"""The engine: requests, scheduling, the step loop, and turning generated tokens into text."""
