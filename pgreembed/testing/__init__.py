"""Test helpers that run real services (e.g. a fake OpenAI server) for tests and demos."""
