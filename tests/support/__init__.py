"""Test servers and fixtures' helpers that are not tests: certificates, secured brokers."""
