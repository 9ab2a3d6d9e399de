"""Hostile input (issue 7, part 3): fuzzed parsers and mapping, damaged and oversized files,
odd headers, compression bombs, abusive uploads and request floods.

Covered elsewhere and not repeated here: SSRF targets of URL sources
(tests/agents/fetch/test_url.py: private, loopback, link-local and metadata addresses, redirects
to them, DNS answers checked), and path traversal and symlink escapes of the filesystem
source (tests/agents/fetch/test_filesystem.py).
"""
